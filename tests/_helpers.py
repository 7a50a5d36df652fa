"""Helpers shared by the CLI tests (importable because pytest puts tests/ on sys.path)."""


def one_line_error(code: int, err: str, *needles: str, exit_code: int = 2) -> None:
    """The CLI's contract for bad input: the exit code, exactly one 'error: ...' line, no traceback."""
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def run_main(*args) -> int:
    """``edgeseg ARGS...`` in-process through ``main()``; returns the exit code (output goes wherever the
    caller captures it)."""
    import sys

    from edgeseg.cli import main

    argv, sys.argv = sys.argv, ["edgeseg", *map(str, args)]
    try:
        main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = argv


def check_f16_runtime(runtime: dict) -> None:
    """A parity record of an fp16 deployment computed with every tensor rounded to f16, the same on every CPU;
    never OpenVINO's bf16 substitute nor its mixed f16/f32 native mode."""
    assert runtime["compute"] == "f16" and runtime["f16"] == "emulated", runtime
    assert runtime["INFERENCE_PRECISION_HINT"] == "f32" and "bf16" not in runtime["op_runtime_precisions"], runtime
    assert runtime["rounded_tensors"] > 100 and "rounded to the nearest float16" in runtime["emulation"], runtime
