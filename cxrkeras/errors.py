"""Exception types whose message is meant for the user (the CLI prints it without a traceback)."""


class CxrError(Exception):
    """A problem with the user's input, files or options; the message says what and what to do."""


class DataError(CxrError):
    """Bad input data: a CSV row, an image file, a split list, a record."""


class ConfigError(CxrError):
    """A bad option or configuration value."""


class Interrupted(CxrError):
    """The command was stopped by a signal (SIGTERM); the CLI exits with 128 + `signum`, as a shell would."""

    def __init__(self, message, signum):
        super().__init__(message)
        self.signum = signum
