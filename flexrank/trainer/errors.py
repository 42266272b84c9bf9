"""The one error type users see for bad input: printed as a message, never as a traceback."""


class ConfigError(ValueError):
    """Bad user input (config key, value, file). The message names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value, self.allowed = key, value, allowed
        msg = f"{key}: got {value!r}; allowed: {allowed}"
        super().__init__(msg + (f" ({hint})" if hint else ""))
