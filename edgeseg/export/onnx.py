"""ONNX backend: ``torch_to_onnx`` (the intermediate every backend starts from) and the ONNX Runtime runner.

The legacy TorchScript exporter (``dynamo=False``, opset 17) is used: with torch 2.13 it is the fast and
robust path (the dynamo exporter silently gives opset 18 and needs a batch-2 example for a dynamic batch).
The graph is then simplified with onnxslim; the batch axis stays dynamic, the spatial size is fixed.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np

from edgeseg.errors import EdgesegError

OPSET = 17
INPUT, OUTPUT = "input", "logits"


def torch_to_onnx(module, size: int, path: Path, metadata: dict[str, str]) -> Path:
    """Export ``module`` ((B, 3, size, size) -> (B, 1, size, size)), simplify it and embed ``metadata``
    as ``metadata_props``. Returns ``path``."""
    import onnx
    import onnxslim
    import torch

    x = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        # The legacy exporter's deprecation notice and the group_norm TracerWarnings are expected here.
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=False, opset_version=OPSET, input_names=[INPUT],
                          output_names=[OUTPUT], dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                          do_constant_folding=True)
    model = onnxslim.slim(onnx.load(str(path)))
    del model.metadata_props[:]
    for key, value in sorted(metadata.items()):
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export(source, request, out_dir: Path) -> tuple[Path, dict]:
    """The onnx target's artefact is the simplified intermediate itself."""
    dst = out_dir / request.target.artefact
    shutil.copyfile(source.onnx_path, dst)
    return dst, {"opset": OPSET, "simplifier": "onnxslim"}


def load_runner(path: Path, target, device: str | None = None, threads: int | None = None):
    """A numpy logits function on ONNX Runtime's CPU provider: sequential, the target's thread count."""
    import onnxruntime as ort

    if device not in (None, "CPU"):
        raise EdgesegError(f"the onnx runner runs on the CPU, not {device}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or target.profile.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def run(x: np.ndarray) -> np.ndarray:
        return session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, np.float32)})[0]

    run.effective = {"provider": session.get_providers()[0], "intra_op_num_threads": opts.intra_op_num_threads,
                     "onnxruntime": ort.__version__}
    return run

