"""Optional CPU runtime for SegAI's network: the ONNX export run through OpenVINO.

``models/model.onnx`` is made from ``models/model.pt`` by MONAI's bundle export command
(``EXPORT_COMMAND``; docs/training.md). :class:`OpenVINONetwork` loads it and is called like the
torch network: ``(N, 1, H, W)`` float32 torch tensor in, ``(N, 1, H, W)`` logits out (batch,
height and width are dynamic axes of the export). :class:`bundle.inferers.BreastTileInferer`
uses it when its ``backend`` is ``"openvino"`` (config switch ``segai_backend``); the torch
path stays the default.

OpenVINO is an optional dependency: ``pip install -e .[openvino]``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["BACKENDS", "EXPORT_COMMAND", "OpenVINONetwork", "import_openvino", "build_segai_runtime"]

#: values of the ``segai_backend`` config switch (``inferer#backend``).
BACKENDS = ("torch", "openvino")

#: the command that writes ``models/model.onnx`` from ``models/model.pt`` (run from the bundle root).
EXPORT_COMMAND = (
    "python -m monai.bundle onnx_export network_def --filepath models/model.onnx "
    "--ckpt_file models/model.pt --meta_file configs/metadata.json --config_file configs/inference.json "
    '--input_shape "[1, 1, 512, 512]" --use_trace True '
    "--converter_kwargs \"{'input_names': ['image'], 'output_names': ['logits'], "
    "'dynamic_axes': {'image': {0: 'batch', 2: 'height', 3: 'width'}, "
    "'logits': {0: 'batch', 2: 'height', 3: 'width'}}}\""
)


def import_openvino() -> Any:
    """The ``openvino`` module, or an ImportError that says how to install it."""
    try:
        import openvino
    except ImportError as e:
        raise ImportError(
            "SegAI backend 'openvino' needs the OpenVINO runtime, which is not installed: "
            "pip install -e .[openvino]  (or set segai_backend to 'torch')"
        ) from e
    return openvino


class OpenVINONetwork:
    """SegAI's ONNX export compiled by OpenVINO for the CPU, called with torch tensors.

    Args:
        onnx_path: the ONNX file (``models/model.onnx``).
        device: OpenVINO device name.
        num_threads: inference threads; None: ``torch.get_num_threads()`` at construction.
        precision: ``INFERENCE_PRECISION_HINT``; ``"f32"`` keeps the maps within about 1e-4 of
            torch's (tests/test_runtime.py), lower precisions are not checked.

    Raises:
        FileNotFoundError: the ONNX file is missing (the message gives the export command).
        ImportError: OpenVINO is not installed (the message gives the install command).
    """

    def __init__(
        self,
        onnx_path: str | os.PathLike,
        device: str = "CPU",
        num_threads: int | None = None,
        precision: str = "f32",
    ) -> None:
        p = self._path = Path(onnx_path)
        self._threads = int(num_threads) if num_threads else torch.get_num_threads()
        ov = import_openvino()
        if not p.is_file():
            raise FileNotFoundError(
                f"{p}: SegAI's ONNX export not found (needed by segai_backend 'openvino'); "
                f"make it from the checkpoint with: {EXPORT_COMMAND}"
            )
        # public attributes are the settings a run records (bundle.runstate.describe): the file
        # by its content, not its path or the thread count
        self.onnx_sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
        self.device = device
        self.precision = precision
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": self._threads}
        self._compiled = core.compile_model(core.read_model(str(p)), device, config)
        self._request = self._compiled.create_infer_request()
        self._output = self._compiled.output(0)

    @property
    def onnx_path(self) -> Path:
        """The ONNX file this was compiled from."""
        return self._path

    @property
    def num_threads(self) -> int:
        """OpenVINO's inference threads."""
        return self._threads

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` tensor (any device) -> float32 logits on the same device."""
        t = x.as_tensor() if hasattr(x, "as_tensor") else x
        arr = np.ascontiguousarray(t.detach().to("cpu", torch.float32).numpy())
        result = self._request.infer({0: arr})
        # the request owns its output buffer and reuses it on the next call: copy it out
        return torch.from_numpy(np.array(result[self._output], dtype=np.float32, copy=True)).to(x.device)

    forward = __call__

    def eval(self) -> OpenVINONetwork:
        """No-op, so code that calls ``network.eval()`` accepts this wrapper."""
        return self

    def __repr__(self) -> str:
        return f"OpenVINONetwork({str(self._path)!r}, device={self.device!r}, num_threads={self.num_threads}, precision={self.precision!r})"


def build_segai_runtime(backend: str, onnx_path: str | os.PathLike | None = None, **kwargs: Any) -> OpenVINONetwork | None:
    """The runtime network for ``backend``: None for ``"torch"`` (use the torch module as given).

    Args:
        backend: one of :data:`BACKENDS`.
        onnx_path: the ONNX file, required for ``"openvino"``.
        kwargs: passed to :class:`OpenVINONetwork`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"SegAI backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    if onnx_path is None:
        raise ValueError("SegAI backend 'openvino' needs onnx_path (the config's @onnx_path, models/model.onnx)")
    return OpenVINONetwork(onnx_path, **kwargs)
