"""Assertions shared by the CLI tests (importable because pytest puts tests/ on sys.path)."""


def one_line_error(code: int, err: str, *needles: str, exit_code: int = 2) -> None:
    """The CLI's contract for bad input: the exit code, exactly one 'error: ...' line, no traceback."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
