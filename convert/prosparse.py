"""ProSparse (arXiv 2402.13516) as small functions for any training loop.

The method, in three steps:
1. activation substitution: `swap_activation(model, "relu")` replaces each decoder layer's
   SwiGLU MLP activation (also `drelu`, `relu2`; `fatrelu` for threshold shifting);
2. progressive sparsity regularisation: loss = LM loss + lambda(t) * sum over layers of
   `l1_regularizer(x1)`, x1 = act(gate(x)) * up(x) being the input of down_proj, with lambda(t)
   from a multi-stage sine schedule (`LambdaSchedule`, `preset_schedule`);
3. activation threshold shifting: FATReLU(t) keeps x >= t and zeroes the rest (`fatrelu`,
   threshold search in `convert.threshold`).

Use from your own loop:

    model = load_hf_model("llama-2-7b")                      # or any LlamaForCausalLM
    swap_activation(model, "relu")
    schedule = preset_schedule("7b", steps=total_steps)
    for step, batch in enumerate(batches):
        with ActivationRecorder(model, with_l1=True) as rec:
            out = model(input_ids=batch, labels=batch)
            loss = out.loss + schedule(step) * rec.l1()
            loss.backward()
        ...

L1 normalisation (the paper leaves it open): per layer the mean of |x1| over all tokens AND
all f neurons, summed over layers. Taking the mean over neurons makes a lambda value mean the
same for any FFN width and any batch shape; summing over layers follows the paper's Eq. 2.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
import torch.nn.functional as F

from hybrid_runtime.activations import NAMES as ACTIVATIONS  # config.json `hidden_act` (+ `hidden_act_param`)
from hybrid_runtime.activations import Activation
from hybrid_runtime.errors import UserError
from hybrid_runtime.model_dir import open_model_dir, read_config

# transformers classes by config.json `model_type`: the LLaMA family this runtime serves.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")


# ----------------------------------------------------------------------------- activations

def fatrelu(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """FATReLU: x where x >= threshold, else 0 (threshold > 0; threshold = 0 is ReLU)."""
    return Activation("fatrelu", threshold).gate_fn(x)


class SparseMLP(nn.Module):
    """A LLaMA MLP with a selectable activation; wraps the layer's own gate/up/down Linear layers.

    x1 = gate_act(gate(x)) * up_act(up(x)) is the input of down_proj: forward pre-hooks on
    `down_proj` (see `ActivationRecorder`) see it without this module storing anything.
    State-dict keys stay `gate_proj.weight`, `up_proj.weight`, `down_proj.weight`.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 act: str, threshold: float = 0.0):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.act, self.threshold = act, float(threshold)
        activation = Activation(act, self.threshold)     # the activation table (hybrid_runtime/activations.py)
        self.gate_act, self.up_act = activation.gate_fn, activation.up_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        x1 = self.gate_act(self.gate_proj(x)) * self.up_act(self.up_proj(x))  # (B, T, f)
        return self.down_proj(x1)  # (B, T, d)

    def extra_repr(self) -> str:
        return f"act={self.act}" + (f", threshold={self.threshold}" if self.act == "fatrelu" else "")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a LLaMA-family HF model (LlamaForCausalLM or its inner LlamaModel)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None or not all(hasattr(l, "mlp") for l in layers):
        raise UserError(f"{type(model).__name__}: not a LLaMA-family model (no .model.layers[i].mlp)")
    return layers


class SparseExperts(nn.Module):
    """Mixtral's experts (transformers' `MixtralExperts`: `gate_up_proj` (E, 2f, d), `down_proj` (E, d, f))
    with a selectable activation; the same parameters, so the state-dict keys do not change.

    Probes, for hooks (the dense MLP's `gate_proj` / `down_proj` play these roles):
      `gate_probe` sees each routed expert's gate pre-activations gate(x) (n_e, f);
      `x1_probe` sees x1 = gate_act(gate(x)) * up_act(up(x)) of all routed (token, expert) pairs at once
      (sum over tokens of top_k rows, f): one L1 term and one zero count per layer, as for a dense FFN.
    Experts are applied in expert order and added per token in that order, as transformers does.
    """

    def __init__(self, experts: nn.Module, act: str, threshold: float = 0.0):
        super().__init__()
        self.gate_up_proj, self.down_proj = experts.gate_up_proj, experts.down_proj
        self.num_experts = self.gate_up_proj.shape[0]
        self.act, self.threshold = act, float(threshold)
        activation = Activation(act, self.threshold)
        self.gate_act, self.up_act = activation.gate_fn, activation.up_fn
        self.gate_probe, self.x1_probe = nn.Identity(), nn.Identity()

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        # x (N, d); top_k_index, top_k_weights (N, k)
        routed, x1s = [], []
        for e in range(self.num_experts):
            token, slot = torch.where(top_k_index == e)                          # (n_e,), (n_e,)
            if token.numel() == 0:
                continue
            gate, up = F.linear(x[token], self.gate_up_proj[e]).chunk(2, dim=-1)  # (n_e, f) each
            x1s.append(self.gate_act(self.gate_probe(gate)) * self.up_act(up))
            routed.append((e, token, slot))
        y = torch.zeros_like(x)
        if not routed:
            return y
        x1 = self.x1_probe(torch.cat(x1s))                                       # (sum n_e, f)
        for (e, token, slot), x1_e in zip(routed, x1.split([len(r[1]) for r in routed])):
            y_e = F.linear(x1_e, self.down_proj[e]) * top_k_weights[token, slot, None]
            y.index_add_(0, token, y_e.to(y.dtype))
        return y

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, act={self.act}" + (
            f", threshold={self.threshold}" if self.act == "fatrelu" else "")


def is_moe(layer: nn.Module) -> bool:
    return hasattr(layer.mlp, "experts")


def down_input_module(layer: nn.Module) -> nn.Module:
    """The module whose forward pre-hook sees the layer's x1 (the input of down_proj) as args[0], (..., f)."""
    return layer.mlp.experts.x1_probe if is_moe(layer) else layer.mlp.down_proj


def gate_output_module(layer: nn.Module) -> nn.Module:
    """The module whose forward hook sees the layer's gate pre-activations gate(x) as its output, (..., f)."""
    return layer.mlp.experts.gate_probe if is_moe(layer) else layer.mlp.gate_proj


def model_activation(model: nn.Module) -> tuple[str, float]:
    """(activation, threshold) the model currently computes, as recorded in its config."""
    act = getattr(model.config, "hidden_act", "silu")
    threshold = float(getattr(model.config, "hidden_act_param", 0.0) or 0.0) if act == "fatrelu" else 0.0
    return act, threshold


def swap_activation(model: nn.Module, act: str, threshold: float = 0.0) -> nn.Module:
    """Make every decoder layer's MLP compute `act` (one of ACTIVATIONS); updates model.config.

    A Mixtral layer's experts become `SparseExperts` (every expert computes `act`; the router is unchanged).

    `threshold` is FATReLU's t (act="fatrelu", t > 0). The layers' Linear weights are reused,
    not copied; swapping again (e.g. relu -> fatrelu after training) is cheap.
    """
    if act not in ACTIVATIONS:
        raise UserError(f"activation '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    if act == "fatrelu" and not threshold > 0:
        raise UserError(f"fatrelu needs a threshold > 0 (got {threshold})")
    if act != "fatrelu" and threshold:
        raise UserError(f"a threshold applies to fatrelu only (got activation {act}, threshold {threshold})")
    for layer in decoder_layers(model):
        mlp = layer.mlp
        if is_moe(layer):
            experts = mlp.experts
            if not all(hasattr(experts, n) for n in ("gate_up_proj", "down_proj")):
                raise UserError(f"{type(experts).__name__}: not Mixtral-style experts (gate_up_proj, down_proj)")
            mlp.experts = SparseExperts(experts, act, threshold)
            continue
        if not all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            raise UserError(f"{type(mlp).__name__}: not a gated (SwiGLU-style) MLP with gate/up/down_proj")
        layer.mlp = SparseMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, act, threshold)
    model.config.hidden_act = act
    if act == "fatrelu":
        model.config.hidden_act_param = float(threshold)
    elif hasattr(model.config, "hidden_act_param"):
        del model.config.hidden_act_param
    return model


# ----------------------------------------------------------------------------- regulariser and statistic

def l1_regularizer(x1: torch.Tensor) -> torch.Tensor:
    """One layer's L1 term: mean of |x1| over all tokens and all f neurons (fp32 scalar).

    x1: (..., f), the input of down_proj. Sum this over layers and multiply by lambda.
    """
    return x1.abs().mean(dtype=torch.float32)


def activation_sparsity(x1: torch.Tensor) -> torch.Tensor:
    """Share of exactly-zero entries of x1 (..., f): fraction of inactive neurons, averaged over tokens."""
    return (x1 == 0).float().mean()


class ActivationRecorder:
    """Context manager: per-layer L1 terms and zero counts of x1 (the input of each layer's down_proj).

    Only scalars are kept: the L1 term stays in the autograd graph (when `with_l1`), the zero
    counts are detached; x1 itself is never stored. Records during forward passes of `model`
    itself (the hooks arm on its entry, disarm on its exit), so one recorder may span several
    forwards (evaluation), and a gradient-checkpointing recompute in backward, which re-runs
    single layers, is not recorded twice. With (non-reentrant) gradient checkpointing, call
    backward INSIDE the `with` block: the recompute must repeat the L1 ops of the forward.

        with ActivationRecorder(model, with_l1=True) as rec:
            loss = model(input_ids=x, labels=x).loss + lam * rec.l1()
            loss.backward()
    """

    def __init__(self, model: nn.Module, with_l1: bool = False):
        self.model = model
        self.layers = decoder_layers(model)
        self.with_l1 = with_l1
        n = len(self.layers)
        self.l1_terms: list[torch.Tensor | None] = [None] * n
        self.zeros: list[torch.Tensor | None] = [None] * n  # count of x1 == 0 per layer
        self.counts: list[int] = [0] * n                    # entries of x1 seen per layer
        self._armed = False
        self._handles: list = []

    def _hook(self, i: int, module: nn.Module, args: tuple) -> None:
        x1 = args[0]  # (B, T, f)
        term = l1_regularizer(x1) if self.with_l1 else None  # also in a recompute: same saved tensors
        if not self._armed:
            return
        if term is not None:
            self.l1_terms[i] = term if self.l1_terms[i] is None else self.l1_terms[i] + term
        zeros = (x1.detach() == 0).sum()
        self.zeros[i] = zeros if self.zeros[i] is None else self.zeros[i] + zeros
        self.counts[i] += x1.numel()

    def _arm(self, *args) -> None:
        self._armed = True

    def _disarm(self, *args) -> None:
        self._armed = False

    def __enter__(self) -> "ActivationRecorder":
        self._handles = [down_input_module(layer).register_forward_pre_hook(partial(self._hook, i))
                         for i, layer in enumerate(self.layers)]
        self._handles += [self.model.register_forward_pre_hook(self._arm),
                          self.model.register_forward_hook(self._disarm)]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = False

    def l1(self) -> torch.Tensor:
        """Sum over layers of `l1_regularizer(x1)` (in the autograd graph)."""
        if not self.with_l1:
            raise RuntimeError("ActivationRecorder(with_l1=False) does not compute the L1 term")
        terms = [t for t in self.l1_terms if t is not None]
        if not terms:
            raise RuntimeError("no forward pass ran inside the ActivationRecorder")
        return torch.stack(terms).sum()

    def sparsity_per_layer(self) -> torch.Tensor:
        """(n_layers,) share of zero entries of x1 per layer, on the model's device (no host sync)."""
        if any(z is None for z in self.zeros):
            raise RuntimeError("no forward pass ran inside the ActivationRecorder")
        return torch.stack([z.double() / c for z, c in zip(self.zeros, self.counts)])


# ----------------------------------------------------------------------------- lambda schedule

@dataclass
class LambdaSchedule:
    """ProSparse's multi-stage sine schedule (paper App. B, Alg. 1).

    `lambdas[i]` is the target of stage i, `boundaries[i]` its last step (cumulative, 0-based
    optimizer step t). Stage 0 (t <= T_0) holds lambda_0 (0: plain continual training); stage 1,
    the warm-up, holds lambda_1; stage i >= 2 on (T_{i-1}, T_i] rises along
        eta = (sin(-pi/2 + pi * (t - T_{i-1}) / (T_i - T_{i-1})) + 1) / 2,
        lambda = lambda_{i-1} + eta * (lambda_i - lambda_{i-1});
    equal consecutive targets hold lambda constant. After the last boundary lambda stays at
    the last target.
    """

    lambdas: list[float]
    boundaries: list[int]

    def __post_init__(self) -> None:
        self.lambdas = [float(v) for v in self.lambdas]
        self.boundaries = [int(b) for b in self.boundaries]
        if len(self.lambdas) != len(self.boundaries):
            raise UserError(f"schedule: {len(self.lambdas)} lambda values but {len(self.boundaries)} "
                            "boundaries (need one boundary per stage)")
        if not self.lambdas:
            raise UserError("schedule: no stages")
        bad = [v for v in self.lambdas if not (v >= 0 and math.isfinite(v))]
        if bad:
            raise UserError(f"schedule: lambda values must be finite and >= 0 (got {bad[0]})")
        if self.boundaries[0] < 0 or any(b < a for a, b in zip(self.boundaries, self.boundaries[1:])):
            raise UserError(f"schedule: boundaries must be >= 0 and non-decreasing (got {self.boundaries})")

    def __call__(self, step: int | float) -> float:
        t = step
        lam, bnd = self.lambdas, self.boundaries
        if t <= bnd[0]:
            return lam[0]
        for i in range(1, len(bnd)):
            if t <= bnd[i]:
                if i == 1:  # warm-up stage: constant
                    return lam[1]
                lo, hi = bnd[i - 1], bnd[i]
                eta = 0.5 * (math.sin(-math.pi / 2 + math.pi * (t - lo) / (hi - lo)) + 1.0)
                return lam[i - 1] + eta * (lam[i] - lam[i - 1])
        return lam[-1]

    @property
    def total_steps(self) -> int:
        return self.boundaries[-1]

    def scaled(self, steps: int, lambda_scale: float = 1.0) -> "LambdaSchedule":
        """The same stages stretched to end at `steps`, lambdas multiplied by `lambda_scale`."""
        if steps <= 0:
            raise UserError(f"schedule: steps must be > 0 (got {steps})")
        if not lambda_scale >= 0:
            raise UserError(f"schedule: lambda scale must be >= 0 (got {lambda_scale})")
        f = steps / self.boundaries[-1]
        return LambdaSchedule([v * lambda_scale for v in self.lambdas],
                              [round(b * f) for b in self.boundaries[:-1]] + [steps])

    def to_dict(self) -> dict:
        return {"lambdas": self.lambdas, "boundaries": self.boundaries}

    @classmethod
    def from_json(cls, path: str | Path) -> "LambdaSchedule":
        """Read {"lambdas": [...], "boundaries": [...]} from a JSON file."""
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{p}: cannot read schedule JSON ({e})") from None
        if not isinstance(d, dict) or not isinstance(d.get("lambdas"), list) \
                or not isinstance(d.get("boundaries"), list):
            raise UserError(f"{p}: expected an object with lists 'lambdas' and 'boundaries'")
        try:
            return cls(d["lambdas"], d["boundaries"])
        except (TypeError, ValueError) as e:
            raise UserError(f"{p}: {e}") from None
        except UserError as e:
            raise UserError(f"{p}: {e}") from None


def sine_schedule(lambdas: list[float], boundaries: list[int]) -> LambdaSchedule:
    """The ProSparse schedule from stage targets and cumulative step boundaries."""
    return LambdaSchedule(list(lambdas), list(boundaries))


# The paper's published schedules (App. B), at their own step counts.
PRESETS: dict[str, LambdaSchedule] = {
    "7b": LambdaSchedule([0, 5e-3, 5e-2, 5e-2, 2e-1, 2e-1], [5000, 6000, 10000, 12000, 16000, 16500]),
    "13b": LambdaSchedule([0, 5e-3, 1e-2, 1e-2, 2e-2, 2e-2], [5500, 6750, 10750, 11000, 15000, 16000]),
    "minicpm-1b": LambdaSchedule([0, 1e-3, 5e-3, 5e-3, 5e-2], [10000, 15000, 20000, 25000, 35000]),
}
# FATReLU thresholds of the released checkpoints.
PRESET_THRESHOLDS = {"7b": 0.01, "13b": 0.01, "minicpm-1b": 0.03}


def preset_schedule(name: str, steps: int | None = None, lambda_scale: float = 1.0) -> LambdaSchedule:
    """A published schedule ('7b', '13b', 'minicpm-1b') stretched to `steps` (default: its own)."""
    if name not in PRESETS:
        raise UserError(f"unknown schedule preset '{name}' (presets: {', '.join(PRESETS)})")
    s = PRESETS[name]
    return s.scaled(steps if steps is not None else s.total_steps, lambda_scale)


# ----------------------------------------------------------------------------- loading HF checkpoints

def read_hf_config(path: str | Path) -> dict:
    """config.json of an HF model directory, checked to be a LLaMA-family model with a known activation."""
    p = Path(path)
    cfg_file = p / "config.json"
    raw = read_config(p)
    mt = raw.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"{cfg_file}: model_type '{mt}' is not LLaMA-family "
                        f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    act = raw.get("hidden_act", "silu")
    if act not in ACTIVATIONS:
        raise UserError(f"{cfg_file}: hidden_act '{act}' is not supported (supported: {', '.join(ACTIVATIONS)})")
    if act == "fatrelu":
        t = raw.get("hidden_act_param")
        if not isinstance(t, (int, float)) or not t > 0:
            raise UserError(f"{cfg_file}: hidden_act 'fatrelu' needs hidden_act_param > 0 (got {t!r})")
    return raw


def load_hf_model(path: str | Path, dtype: torch.dtype | None = torch.float32,
                  device: str | torch.device = "cpu") -> nn.Module:
    """Load a LLaMA-family HF checkpoint with transformers, whatever activation its config names.

    transformers knows neither `fatrelu` (released ProSparse checkpoints: hidden_act "fatrelu"
    + hidden_act_param) nor `drelu`: the model is built with a known activation and then
    swapped to the recorded one, so it computes exactly what config.json says.
    """
    from transformers import AutoConfig, LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM
    from transformers.utils import logging as hf_logging

    raw = read_hf_config(path)
    act = raw.get("hidden_act", "silu")
    threshold = float(raw.get("hidden_act_param", 0.0)) if act == "fatrelu" else 0.0
    cls = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM,
           "mixtral": MixtralForCausalLM}[raw["model_type"]]
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.hidden_act = "silu" if act == "silu" else "relu"  # a name transformers can build; swapped below
    source, extra = path, {}
    md = open_model_dir(path)
    if md.is_hybrid:  # native tensor names: translate them back (see _hybrid_state_as_hf)
        source, extra = None, {"state_dict": _hybrid_state_as_hf(md)}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(source, config=config, dtype=dtype, local_files_only=True,
                                          output_loading_info=True, **extra)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot load the model weights ({str(e).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    missing = sorted(info["missing_keys"])
    if missing:  # transformers would fill these with random values: never evaluate or train that
        raise UserError(f"{path}: the checkpoint lacks {len(missing)} weights that config.json needs, "
                        f"e.g. {missing[0]!r}")
    if act not in ("silu", "relu") or md.config.n_experts:  # experts: always, for SparseExperts' probes
        swap_activation(model, act, threshold)
    return model.to(device)


def _hybrid_state_as_hf(md) -> dict[str, torch.Tensor]:
    """A hybrid model directory's weights under the HF names of the hub layout (down transposed back to
    (d, f)); transformers converts that layout as it converts a checkpoint's files (Mixtral's experts too).

    Its FFN neurons are permuted by activation frequency; gate, up and down rows move together,
    so the model computes the same function as the checkpoint it was packed from.
    """
    from safetensors.torch import load_file

    from hybrid_runtime.loading import hf_name
    state = {}
    for name, t in load_file(str(md.hybrid.weights_file)).items():
        mapped = hf_name(name)
        if mapped is None:
            raise UserError(f"{md.hybrid.weights_file}: unknown tensor {name!r}")
        state[mapped[0]] = t.t().contiguous() if mapped[1] else t
    return state


def load_tokenizer(path: str | Path):
    """The tokenizer saved beside an HF model (fast tokenizer files)."""
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: cannot load a tokenizer ({str(e).splitlines()[0]})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")
