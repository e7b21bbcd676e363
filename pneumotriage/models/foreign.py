"""Any other model, brought in through a door whose contract the user states: a TorchScript program or an ONNX
graph, kept as the file's own bytes inside a pneumotriage checkpoint (``pneumotriage convert --format torchscript``
or ``onnx``), run by TorchScript's interpreter or by ONNX Runtime (the ``onnx`` extra).

What the file cannot say, the user gives, and the checkpoint records: the input side and pipeline, the
normalisation (and with it one channel or three), which output is the finding, and whether that output is a logit
or a probability already (a sigmoid inside the program). Like every model of the project it takes ``(B, 1, H, W)``
grey images and returns a classifier's logit ``(B,)`` or a segmenter's ``{"mask": logits (B, 1, H, W)}``.

Unlike a state dict, both formats are programs: TorchScript runs in its own interpreter (no Python), an ONNX graph
in ONNX Runtime; neither reads this tool's data beyond its input. Bring only files from people you trust.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from pneumotriage.errors import UsageError
from pneumotriage.models.normalise import Normalise

#: runtime name -> what runs it.
RUNTIMES = {"torchscript": "TorchScript's interpreter", "onnx": "ONNX Runtime"}
#: What a program's chosen output is: "logit" (a sigmoid gives the probability) or "probability".
ACTIVATIONS = ("logit", "probability")


class ForeignProgram(nn.Module):
    """A TorchScript program or an ONNX graph (its bytes in the ``program`` buffer) behind the project's model
    contract. The runtime object is built on first use for the device of the input and never pickled or copied:
    a copy (``copy.deepcopy``, a worker process) builds its own."""

    def __init__(
        self,
        runtime: str,
        kind: str,
        *,
        normalisation: str = "unit",
        output_index: int = 0,
        activation: str = "logit",
        program: bytes = b"",
    ) -> None:
        super().__init__()
        if runtime not in RUNTIMES:
            raise KeyError(f"unknown runtime {runtime!r}; valid: {', '.join(RUNTIMES)}")
        if runtime == "onnx" and importlib.util.find_spec("onnxruntime") is None:
            raise UsageError(
                "this model is an ONNX graph: running it needs ONNX Runtime, which is not installed",
                hint="pip install 'pneumotriage[onnx]'",
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown output activation {activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.runtime, self.kind = runtime, kind
        self.output_index, self.activation = output_index, activation
        self.normalise = Normalise(normalisation)
        self.program: torch.Tensor
        self.register_buffer(
            "program",
            torch.frombuffer(bytearray(program), dtype=torch.uint8) if program else torch.empty(0, dtype=torch.uint8),
        )
        self._runners: dict[str, Any] = {}

    # the buffer takes the size of the program it is given (a fresh network has none)
    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        given = state_dict.get(prefix + "program")
        if isinstance(given, torch.Tensor) and given.shape != self.program.shape:
            self.program = torch.empty_like(given)
            self._runners = {}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_runners"] = {}
        return state

    def __deepcopy__(self, memo: dict[int, Any]) -> ForeignProgram:
        import copy

        new = ForeignProgram.__new__(ForeignProgram)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = {} if key == "_runners" else copy.deepcopy(value, memo)
        return new

    def _runner(self, device: torch.device) -> Any:
        key = str(device)
        if key not in self._runners:
            data = self.program.cpu().numpy().tobytes()
            if self.runtime == "torchscript":
                with warnings.catch_warnings():  # torch >= 2.9 calls TorchScript deprecated; it loads and runs
                    warnings.simplefilter("ignore", FutureWarning)
                    runner = torch.jit.load(io.BytesIO(data), map_location=device)  # type: ignore[no-untyped-call]
                runner.eval()
            else:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = torch.get_num_threads()  # the threads the scan chose for its models
                runner = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
            self._runners[key] = runner
        return self._runners[key]

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """The program's output for an already normalised input, as one tensor (the first output of several)."""
        runner = self._runner(x.device)
        if self.runtime == "torchscript":
            out = runner(x)
        else:
            entry = runner.get_inputs()[0]
            data = np.ascontiguousarray(x.detach().float().cpu().numpy())
            fixed = entry.shape[0] if entry.shape and isinstance(entry.shape[0], int) else None
            step = fixed if fixed and fixed != len(data) else len(data)  # a graph exported for batches of one
            parts = [
                np.asarray(runner.run(None, {entry.name: data[i : i + step]})[0]) for i in range(0, len(data), step)
            ]
            out = torch.from_numpy(np.concatenate(parts)).to(x.device)
        if isinstance(out, dict):
            out = next(iter(out.values()))
        if isinstance(out, list | tuple):
            out = out[0]
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the program returned {type(out).__name__}, not a tensor")
        return out

    def choose(self, out: torch.Tensor) -> Any:
        """The project's output from the program's: the chosen output (or map channel) as a logit."""
        out = out.float()
        if self.kind == "classifier":
            chosen = out.reshape(out.shape[0], -1)[:, self.output_index]
        else:
            chosen = (out if out.ndim == 4 else out[:, None])[:, self.output_index : self.output_index + 1]
        if self.activation == "probability":
            chosen = torch.logit(chosen.clamp(1e-7, 1 - 1e-7))
        return chosen if self.kind == "classifier" else {"mask": chosen}

    def forward(self, x: torch.Tensor) -> Any:
        return self.choose(self.raw(self.normalise(x)))


def run_once(model: ForeignProgram, size: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The program's raw output for two grey images of the declared side, and the shape of its input; raises
    ValueError where the runtime refuses that input (whatever it raises, in one line)."""
    x = model.normalise(torch.rand(2, 1, size, size, generator=torch.Generator().manual_seed(0)))
    try:
        with torch.no_grad():
            return model.raw(x), tuple(x.shape)
    except Exception as exc:  # whatever the runtime raises: the program does not take this input
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ValueError(f"it does not run on input {tuple(x.shape)}: {first}") from None


def outputs_of(model: ForeignProgram, out: torch.Tensor) -> int:
    """How many outputs a classifier's output holds per image, or a segmenter's map channels."""
    if model.kind == "classifier":
        return int(out.reshape(out.shape[0], -1).shape[1]) if out.ndim >= 1 and out.shape[0] else 0
    return int(out.shape[1]) if out.ndim == 4 else 1


def check_contract(model: ForeignProgram, out: torch.Tensor, size: int, given: tuple[int, ...]) -> str:
    """Whether the program's output ``out`` (:func:`run_once`) keeps the contract: its shape, probabilities in
    [0, 1] where it says so, finite values; says what it returned, or raises ValueError saying how it breaks it."""
    outputs = outputs_of(model, out)
    if model.kind == "classifier":
        if out.shape[0] != 2 or outputs < 1:
            raise ValueError(f"its output has shape {tuple(out.shape)}, not (batch, outputs)")
    elif out.shape[0] != 2 or out.ndim not in (3, 4) or tuple(out.shape[-2:]) != (size, size):
        raise ValueError(f"its output has shape {tuple(out.shape)}, not a map (batch, {outputs}, {size}, {size})")
    if model.activation == "probability" and (float(out.min()) < 0.0 or float(out.max()) > 1.0):
        raise ValueError(
            f"its outputs reach {float(out.min()):.3g}..{float(out.max()):.3g}: not probabilities (say logits)"
        )
    chosen = model.choose(out)
    values = chosen if isinstance(chosen, torch.Tensor) else chosen["mask"]
    if not bool(torch.isfinite(values).all()):
        raise ValueError("it gives values that are not finite on a plain input")
    return f"output {tuple(out.shape)} for input {given}"


def runtime_version(runtime: str) -> str:
    """What runs a program here, with its version (recorded at convert)."""
    if runtime == "torchscript":
        return f"TorchScript (torch {torch.__version__})"
    import onnxruntime as ort

    return f"ONNX Runtime {ort.__version__}"
