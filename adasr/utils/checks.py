"""Argument checks shared by every layer: each raises a ValueError that names the option."""


def is_real(value) -> bool:
    """An int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """Return ``value`` if it is an int (not a bool) >= ``minimum``, else raise a ValueError naming the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f'{name} must be an integer >= {minimum}, got {value!r}')
    return value


def check_positive(name: str, value) -> float:
    """Return ``value`` as a float if it is a number > 0, else raise a ValueError naming the option."""
    if not is_real(value) or value <= 0:
        raise ValueError(f'{name} must be a positive number, got {value!r}')
    return float(value)


def check_choice(name: str, value, choices) -> None:
    """Raise a ValueError that names the option when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f'{name}={value!r} is not supported; choose one of {list(choices)}')
