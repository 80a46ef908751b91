"""The project's own error for input a caller got wrong: an unknown name, a value out of its range, a
request the stream cannot do. Its message is written for the client; the server answers it as a 4xx or
a control `error` and catches nothing broader, so a bug stays a logged bug instead of a client message."""


class InputError(ValueError):
    """Refused input; the message names what is wrong and what is accepted."""
