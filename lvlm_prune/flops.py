"""Analytic FLOPs accounting for LLaVA-style prefill, and a measured count for plug-in modules.

Two conventions for the language model (METHODS.md section 5):

- ``"fastv"``: the FastV paper's per-layer formula ``4 n d^2 + 2 n^2 d + 2 n d m`` (n tokens, d hidden,
  m FFN width). It counts one multiply-add as one FLOP, assumes multi-head attention and a
  two-matrix FFN; it is the number the pruning papers report.
- ``"exact"``: one multiply-add = 2 FLOPs, grouped-query k/v projections, the three-matrix SwiGLU
  MLP, and the full n x n attention that eager and SDPA compute (``causal="half"`` counts only the
  lower triangle). This is what ``torch.utils.flop_counter.FlopCounterMode`` measures.

Both ignore norms, rotary embeddings, softmax, activations and residual adds (O(n d) or O(n m) work
each, the softmax O(heads n^2), small next to the attention products; FlopCounterMode ignores them
too). The vision tower, projector and plug-ins are always counted the exact way.

Token counts may be floats: a per-sample average over a batch gives the FLOPs at the average
count, which underestimates the mean of the per-sample FLOPs slightly because attention is
quadratic in n.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

CONVENTIONS = ("fastv", "exact")
CAUSAL_MODES = ("full", "half")


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_non_negative(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclass(frozen=True)
class LLMShape:
    """Shape of a Llama-family decoder.

    Args:
        hidden_size: model width d.
        intermediate_size: SwiGLU width m.
        num_layers: decoder depth.
        num_heads: query heads.
        num_kv_heads: key/value heads (fewer than num_heads = grouped-query attention).
        head_dim: width of one head.
        vocab_size: rows of the LM head.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "vocab_size"):
            _check_positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    @classmethod
    def from_config(cls, text_config: Any) -> LLMShape:
        """From a transformers ``LlamaConfig``-like object (``LlavaConfig.text_config``)."""
        if not hasattr(text_config, "num_hidden_layers"):
            raise ValueError(
                f"text_config ({type(text_config).__name__}) has no num_hidden_layers; pass the "
                "decoder's config (for LLaVA: config.text_config)"
            )
        heads = text_config.num_attention_heads
        kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
        head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
        return cls(
            hidden_size=text_config.hidden_size,
            intermediate_size=text_config.intermediate_size,
            num_layers=text_config.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=text_config.vocab_size,
        )


@dataclass(frozen=True)
class VisionShape:
    """Shape of a CLIP-style ViT.

    Args:
        hidden_size: ViT width.
        intermediate_size: MLP width.
        num_layers: encoder depth.
        num_heads: attention heads (q/k/v/o are all hidden_size x hidden_size).
        image_size: input resolution in pixels (square).
        patch_size: patch side; patches = (image_size // patch_size) ** 2.
        num_channels: input channels of the patch convolution.
        has_cls_token: whether a [CLS] token is prepended (CLIP: yes, SigLIP: no).
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    has_cls_token: bool = True

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size",
                     "patch_size", "num_channels"):
            _check_positive_int(name, getattr(self, name))
        if self.patch_size > self.image_size:
            raise ValueError(
                f"patch_size={self.patch_size} is larger than image_size={self.image_size}"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_tokens(self) -> int:
        """Sequence length inside the encoder (patches plus [CLS] if any)."""
        return self.num_patches + int(self.has_cls_token)

    @classmethod
    def from_config(cls, vision_config: Any, has_cls_token: bool | None = None) -> VisionShape:
        """From a transformers ``CLIPVisionConfig``-like object (``LlavaConfig.vision_config``).

        Args:
            vision_config: the vision tower's config.
            has_cls_token: None infers it from ``model_type`` (CLIP: True, SigLIP: False).
        """
        if not hasattr(vision_config, "patch_size"):
            raise ValueError(
                f"vision_config ({type(vision_config).__name__}) has no patch_size; pass the vision "
                "tower's config (for LLaVA: config.vision_config)"
            )
        if has_cls_token is None:
            model_type = getattr(vision_config, "model_type", "")
            if model_type.startswith("clip"):
                has_cls_token = True
            elif model_type.startswith("siglip"):
                has_cls_token = False
            else:
                raise ValueError(
                    f"has_cls_token cannot be inferred for vision model_type={model_type!r}; pass it"
                )
        return cls(
            hidden_size=vision_config.hidden_size,
            intermediate_size=vision_config.intermediate_size,
            num_layers=vision_config.num_hidden_layers,
            num_heads=vision_config.num_attention_heads,
            image_size=vision_config.image_size,
            patch_size=vision_config.patch_size,
            num_channels=getattr(vision_config, "num_channels", 3),
            has_cls_token=has_cls_token,
        )


@dataclass(frozen=True)
class ProjectorShape:
    """Shape of LLaVA's two-layer projector: ``linear_2(act(linear_1(x)))``.

    Args:
        in_dim: input width of linear_1 (vision width x number of feature layers read).
        hidden_dim: output width of linear_1 (= input of linear_2).
        out_dim: output width of linear_2 (the LLM's hidden size).
    """

    in_dim: int
    hidden_dim: int
    out_dim: int

    def __post_init__(self) -> None:
        for name in ("in_dim", "hidden_dim", "out_dim"):
            _check_positive_int(name, getattr(self, name))

    @classmethod
    def from_config(cls, llava_config: Any) -> ProjectorShape:
        """From a transformers ``LlavaConfig``."""
        layers = llava_config.vision_feature_layer
        num_feature_layers = 1 if isinstance(layers, int) else len(layers)
        text_hidden = llava_config.text_config.hidden_size
        return cls(
            in_dim=llava_config.vision_config.hidden_size * num_feature_layers,
            hidden_dim=text_hidden,
            out_dim=text_hidden,
        )


def _attention_pairs(tokens: float, causal: str) -> float:
    """Query-key pairs a layer scores: all n^2, or the causal lower triangle with its diagonal."""
    return tokens * tokens if causal == "full" else tokens * (tokens + 1) / 2


def llm_layer_flops(
    shape: LLMShape, tokens: float, convention: str = "fastv", causal: str = "full"
) -> float:
    """FLOPs of one decoder layer on ``tokens`` positions (prefill, one sample).

    Args:
        shape: the decoder's shape.
        tokens: sequence length n entering the layer (float allowed: an average).
        convention: ``"fastv"`` (``4nd^2 + 2n^2d + 2ndm``) or ``"exact"`` (see the module docstring).
        causal: ``"full"`` counts the n x n attention eager/SDPA compute; ``"half"`` only the
            n(n+1)/2 causal pairs (``"exact"`` only; FastV's formula is fixed).
    """
    _check_choice("convention", convention, CONVENTIONS)
    _check_choice("causal", causal, CAUSAL_MODES)
    n = _check_non_negative("tokens", tokens)
    d, m = shape.hidden_size, shape.intermediate_size
    if convention == "fastv":
        return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m
    q_width = shape.num_heads * shape.head_dim
    kv_width = shape.num_kv_heads * shape.head_dim
    projections = 2 * n * d * q_width * 2 + 2 * n * d * kv_width * 2
    attention = 2 * 2 * _attention_pairs(n, causal) * q_width
    mlp = 6 * n * d * m
    return projections + attention + mlp


def _validate_schedule(shape: LLMShape, visual_tokens_per_layer: Sequence[float]) -> list[float]:
    schedule = [float(v) for v in visual_tokens_per_layer]
    if len(schedule) != shape.num_layers:
        raise ValueError(
            f"visual_tokens_per_layer has {len(schedule)} entries, expected one per decoder layer "
            f"({shape.num_layers})"
        )
    for index, value in enumerate(schedule):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"visual_tokens_per_layer[{index}] must be a finite number >= 0, got {value!r}"
            )
    return schedule


def llm_prefill_flops(
    shape: LLMShape,
    text_tokens: float,
    visual_tokens_per_layer: Sequence[float],
    convention: str = "fastv",
    include_lm_head: bool = False,
    lm_head_tokens: float = 1.0,
    causal: str = "full",
) -> float:
    """Prefill FLOPs of the decoder for one sample whose visual tokens shrink layer by layer.

    Layer l sees ``n_l = text_tokens + visual_tokens_per_layer[l]`` positions.

    Args:
        shape: the decoder's shape.
        text_tokens: non-visual positions (system prompt, question, caption, ...).
        visual_tokens_per_layer: visual tokens in each decoder layer's input, length num_layers.
        convention: ``"fastv"`` or ``"exact"``.
        include_lm_head: add the LM head (``2 t d V`` exact, ``t d V`` FastV, t = lm_head_tokens).
        lm_head_tokens: positions whose logits are computed. Generation needs only the last
            prompt position's logits (transformers' generate passes ``logits_to_keep=1``), hence 1;
            a stock ``forward`` computes logits for every position.
        causal: ``"full"`` or ``"half"`` attention pairs (``"exact"`` only).
    """
    _check_choice("convention", convention, CONVENTIONS)
    _check_choice("causal", causal, CAUSAL_MODES)
    if convention == "fastv" and causal != "full":
        raise ValueError("causal='half' needs convention='exact'; the FastV formula is fixed")
    text = _check_non_negative("text_tokens", text_tokens)
    schedule = _validate_schedule(shape, visual_tokens_per_layer)
    total = sum(llm_layer_flops(shape, text + visual, convention, causal) for visual in schedule)
    if include_lm_head:
        head_tokens = _check_non_negative("lm_head_tokens", lm_head_tokens)
        multiply_add = 2 if convention == "exact" else 1
        total += multiply_add * head_tokens * shape.hidden_size * shape.vocab_size
    return float(total)


def layer_average_visual_tokens(visual_tokens_per_layer: Sequence[float]) -> float:
    """Equivalent visual tokens: the mean over decoder layers (METHODS.md section 0)."""
    schedule = [float(v) for v in visual_tokens_per_layer]
    if not schedule:
        raise ValueError("visual_tokens_per_layer is empty")
    for index, value in enumerate(schedule):
        if not math.isfinite(value) or value < 0:
            raise ValueError(
                f"visual_tokens_per_layer[{index}] must be a finite number >= 0, got {value!r}"
            )
    return sum(schedule) / len(schedule)


def prune_ratio_realised(visual_tokens_per_layer: Sequence[float], num_visual_tokens: int) -> float:
    """Layer-averaged prune ratio ``1 - mean_l(visual_l) / N``.

    Args:
        visual_tokens_per_layer: visual tokens in each decoder layer's input.
        num_visual_tokens: N, the visual tokens before any pruning.
    """
    _check_positive_int("num_visual_tokens", num_visual_tokens)
    return 1.0 - layer_average_visual_tokens(visual_tokens_per_layer) / num_visual_tokens


def vision_layers_for_feature_layer(vision_feature_layer: int | Sequence[int], num_layers: int) -> int:
    """Encoder layers that must run to produce ``hidden_states[vision_feature_layer]``.

    ``hidden_states`` has ``num_layers + 1`` entries: index 0 is the patch embeddings, index i the
    output of layer i, -1 the last layer, -2 all but the last (LLaVA-1.5). A list reads several.
    """
    _check_positive_int("num_layers", num_layers)
    indices = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    if not indices:
        raise ValueError("vision_feature_layer is an empty list")
    states = num_layers + 1
    resolved = []
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not -states <= index < states:
            raise ValueError(
                f"vision_feature_layer={vision_feature_layer!r} is outside the {states} hidden states "
                f"of a {num_layers}-layer vision tower"
            )
        resolved.append(index % states)
    return max(resolved)


def vision_flops(shape: VisionShape, layers_run: int | None = None, num_images: int = 1) -> float:
    """Exact FLOPs of the ViT: patch convolution plus ``layers_run`` encoder layers.

    Per layer on T tokens of width D with MLP width I: q/k/v/o ``8 T D^2``, attention ``4 T^2 D``
    (full, as eager and SDPA compute it), MLP ``4 T D I``. LayerNorms, GELU and position
    embeddings are not counted.

    Args:
        shape: the ViT's shape.
        layers_run: encoder layers executed (None = all). LLaVA only needs the layers up to the
            one it reads (``vision_layers_for_feature_layer``); a stock transformers forward runs
            all of them.
        num_images: images per sample.
    """
    layers = shape.num_layers if layers_run is None else layers_run
    if isinstance(layers, bool) or not isinstance(layers, int) or not 0 <= layers <= shape.num_layers:
        raise ValueError(f"layers_run must be an int in [0, {shape.num_layers}], got {layers_run!r}")
    _check_positive_int("num_images", num_images)
    t, d = shape.num_tokens, shape.hidden_size
    patch_conv = 2 * shape.num_patches * d * shape.num_channels * shape.patch_size**2
    per_layer = 8 * t * d * d + 4 * t * t * d + 4 * t * d * shape.intermediate_size
    return float(num_images * (patch_conv + layers * per_layer))


def projector_flops(in_dim: int, out_dim: int, tokens: float, hidden_dim: int | None = None) -> float:
    """Exact FLOPs of LLaVA's projector ``linear_2(act(linear_1(x)))`` on ``tokens`` features.

    Args:
        in_dim: linear_1 input width.
        out_dim: linear_2 output width.
        tokens: features projected (576 for LLaVA-1.5: the [CLS] token is dropped first).
        hidden_dim: linear_1 output width (None = out_dim, as in LLaVA).
    """
    _check_positive_int("in_dim", in_dim)
    _check_positive_int("out_dim", out_dim)
    hidden = out_dim if hidden_dim is None else hidden_dim
    _check_positive_int("hidden_dim", hidden)
    n = _check_non_negative("tokens", tokens)
    return float(2 * n * (in_dim * hidden + hidden * out_dim))


def _cpu_sdpa_forward_flops(query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def register_cpu_sdpa_flop_formulas() -> None:
    """Teach FlopCounterMode the CPU SDPA kernels (forward and backward); safe to call again.

    On CPU ``F.scaled_dot_product_attention`` dispatches to
    ``aten._scaled_dot_product_flash_attention_for_cpu``, which torch's registry lacks, so SDPA
    attention counts 0 FLOPs. The formula is the full (non-causal) one torch uses for the other
    SDPA kernels. A FlopCounterMode copies the registry when constructed: call this first.
    """
    from torch.utils import flop_counter

    formulas = {
        "_scaled_dot_product_flash_attention_for_cpu": _cpu_sdpa_forward_flops,
        "_scaled_dot_product_flash_attention_for_cpu_backward": _cpu_sdpa_backward_flops,
    }
    for op_name, formula in formulas.items():
        op = getattr(torch.ops.aten, op_name, None)
        if op is not None and op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


def module_flops(module: nn.Module, *example_inputs: Any, **example_kwargs: Any) -> int:
    """Forward FLOPs of ``module(*example_inputs, **example_kwargs)`` measured by FlopCounterMode.

    Runs under ``torch.no_grad()`` with the module in its current train/eval mode; counts matmuls,
    convolutions and attention (SDPA included), 2 FLOPs per multiply-add. Use it for plug-ins
    (pruners, adapters, caption models, selectors) with inputs of the size one sample brings.
    """
    from torch.utils.flop_counter import FlopCounterMode

    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    register_cpu_sdpa_flop_formulas()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*example_inputs, **example_kwargs)
    return int(counter.get_total_flops())


@dataclass
class FlopsReport:
    """Per-sample prefill FLOPs of an LVLM, split by component.

    Args:
        llm_prefill: decoder prefill FLOPs (in ``convention``).
        vision: vision tower FLOPs (exact).
        projector: projector FLOPs (exact).
        plugins: extra modules (pruners, adapters, caption model, selector) by name (exact).
        convention: how ``llm_prefill`` was counted, ``"fastv"`` or ``"exact"``.
    """

    llm_prefill: float
    vision: float = 0.0
    projector: float = 0.0
    plugins: dict[str, float] = field(default_factory=dict)
    convention: str = "fastv"

    def __post_init__(self) -> None:
        _check_choice("convention", self.convention, CONVENTIONS)
        self.llm_prefill = _check_non_negative("llm_prefill", self.llm_prefill)
        self.vision = _check_non_negative("vision", self.vision)
        self.projector = _check_non_negative("projector", self.projector)
        self.plugins = {
            str(name): _check_non_negative(f"plugins[{name!r}]", value)
            for name, value in dict(self.plugins).items()
        }

    @property
    def plugins_total(self) -> float:
        return float(sum(self.plugins.values()))

    @property
    def total(self) -> float:
        return self.llm_prefill + self.vision + self.projector + self.plugins_total

    @property
    def total_tflops(self) -> float:
        return self.total / 1e12

    def tflops(self) -> dict[str, float]:
        """Each component and the total in TFLOPs (plug-ins as ``plugin/<name>``)."""
        return {key: value / 1e12 for key, value in self.to_metrics().items()}

    def to_metrics(self) -> dict[str, float]:
        """Flat float dict for loggers: components, ``plugin/<name>`` entries and ``total``."""
        metrics = {"llm_prefill": self.llm_prefill, "vision": self.vision, "projector": self.projector}
        metrics.update({f"plugin/{name}": value for name, value in self.plugins.items()})
        metrics["total"] = self.total
        return metrics

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: convention, components, plug-ins (nested) and total, in FLOPs."""
        return {
            "convention": self.convention,
            "llm_prefill": self.llm_prefill,
            "vision": self.vision,
            "projector": self.projector,
            "plugins": dict(self.plugins),
            "total": self.total,
        }


def llava_prefill_report(
    model_config: Any,
    text_tokens: float,
    visual_tokens_per_layer: Sequence[float],
    convention: str = "fastv",
    plugins: Mapping[str, float] | None = None,
    include_lm_head: bool = False,
    lm_head_tokens: float = 1.0,
    causal: str = "full",
    run_all_vision_layers: bool = False,
    num_images: int = 1,
) -> FlopsReport:
    """Per-sample prefill FLOPs of a LLaVA model from its ``LlavaConfig``.

    The vision tower is charged for the layers up to the one LLaVA reads
    (``config.vision_feature_layer``; -2 in LLaVA-1.5 skips the last layer). The projector runs on
    the patch features (plus [CLS] when ``vision_feature_select_strategy == "full"``).

    Args:
        model_config: a transformers ``LlavaConfig`` (text_config, vision_config, ...).
        text_tokens: non-visual positions in the prompt.
        visual_tokens_per_layer: visual tokens in each decoder layer's input (length: decoder depth).
        convention: LLM convention, ``"fastv"`` or ``"exact"``; other parts are always exact.
        plugins: extra FLOPs by module name (e.g. from ``module_flops``).
        include_lm_head: add the LM head (see ``llm_prefill_flops``).
        lm_head_tokens: positions whose logits are computed.
        causal: ``"full"`` or ``"half"`` attention pairs (``"exact"`` only).
        run_all_vision_layers: charge every vision layer, as a stock transformers forward runs them.
        num_images: images per sample.
    """
    for name in ("text_config", "vision_config", "vision_feature_layer"):
        if not hasattr(model_config, name):
            raise ValueError(f"model_config ({type(model_config).__name__}) has no {name}; pass a LlavaConfig")
    _check_positive_int("num_images", num_images)
    llm_shape = LLMShape.from_config(model_config.text_config)
    vision_shape = VisionShape.from_config(model_config.vision_config)
    projector_shape = ProjectorShape.from_config(model_config)
    layers_run = (
        vision_shape.num_layers
        if run_all_vision_layers
        else vision_layers_for_feature_layer(model_config.vision_feature_layer, vision_shape.num_layers)
    )
    strategy = getattr(model_config, "vision_feature_select_strategy", "default")
    _check_choice("vision_feature_select_strategy", strategy, ("default", "full"))
    features = vision_shape.num_patches if strategy == "default" else vision_shape.num_tokens
    return FlopsReport(
        llm_prefill=llm_prefill_flops(
            llm_shape, text_tokens, visual_tokens_per_layer, convention,
            include_lm_head=include_lm_head, lm_head_tokens=lm_head_tokens, causal=causal,
        ),
        vision=vision_flops(vision_shape, layers_run=layers_run, num_images=num_images),
        projector=projector_flops(
            projector_shape.in_dim, projector_shape.out_dim, features * num_images,
            hidden_dim=projector_shape.hidden_dim,
        ),
        plugins=dict(plugins or {}),
        convention=convention,
    )
