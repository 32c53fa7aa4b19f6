"""`FileProblem`: why one attached file or pasted image URL could not be used.

Every module on the file path (Slack download, URL fetch, document and image parsing)
raises this one exception with a reason written for the user ("is password-protected",
"is larger than 20 MB"). The caller turns it into one line naming the file, keeps going
with the rest of the message, and logs `kind` — so bad input is never a crash, a stack
trace in Slack or a silent drop.
"""

from __future__ import annotations


class FileProblem(Exception):
    """`reason` completes the sentence "<file name> …"; `kind` is a short tag for logs."""

    def __init__(self, reason: str, kind: str = "unreadable") -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
