"""The one error type users see for bad input: printed as a message, never as a traceback."""


class ConfigError(ValueError):
    """Bad user input (config key, value, file). The message names the key, the value and what is allowed."""

    def __init__(self, key: str, value, allowed: str, hint: str = ""):
        self.key, self.value, self.allowed, self.hint = key, value, allowed, hint
        msg = f"{key}: got {value!r}; allowed: {allowed}"
        super().__init__(msg + (f" ({hint})" if hint else ""))

    def under(self, key: str) -> "ConfigError":
        """The same problem reported under another key (e.g. where a file sits in the recipe)."""
        return ConfigError(key, self.value, self.allowed, self.hint)


class ConfigErrors(ConfigError):
    """Several independent problems found at once: each is printed on its own line."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        first = self.errors[0]
        self.key, self.value, self.allowed, self.hint = first.key, first.value, first.allowed, first.hint
        ValueError.__init__(self, "\n".join(str(e) for e in self.errors))
