"""Errors a user can hit. Each carries the exit code the CLI uses; caught once at the edge."""


class P2PError(Exception):
    """A problem explained to the user in one line."""

    exit_code = 1


class UsageError(P2PError):
    """A wrong flag or argument value."""

    exit_code = 2


class ModelFileError(P2PError):
    """A model file that is missing, corrupt, truncated or disagrees with its own metadata."""

    exit_code = 2

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsupportedModelError(ModelFileError):
    """A well-formed model of an architecture we do not run."""


class ModelOutputError(P2PError):
    """A model that computes NaN or infinite logits: its weights are broken, whatever read them."""

    exit_code = 2


class InfeasiblePlanError(P2PError):
    """The model cannot be placed on the available peers."""

    exit_code = 3
