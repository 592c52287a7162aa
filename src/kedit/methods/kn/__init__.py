"""KN: Knowledge Neurons (Dai, Dong, Hao, Sui, Chang, Wei, "Knowledge Neurons in Pretrained Transformers",
ACL 2022), in the form EasyEdit runs on causal LMs (its vendored ``knowledge_neurons`` package, by Sid Black).
METHODS.md §12.

**Attribution.** A *neuron* ``(l, i)`` is coordinate ``i`` of the MLP intermediate activation of layer ``l`` -- the
**input of** ``mlp_out`` (post-activation, and for gated MLPs ``act(gate)·up``), i.e. exactly the paper's
``gelu(H W₁)``. EasyEdit hooks the *output* of ``c_fc`` / ``gate_proj`` instead (pre-activation) and hard-codes the
intermediate size to 4d (wrong for Llama); we follow the paper and take the size from the weight. For each prompt
and each token of the ground truth (teacher forced: the prompt is extended by the earlier truth tokens; the
reference extends by its own argmax instead), integrated gradients at the last position are

    score_i = a_i · (1/m) Σ_{k=1..m} ∂P(truth | a_i ← (k/m)·a_i) / ∂a_i

(Riemann sum, one layer patched at a time, as the reference; ``m = steps``; ``m = 1`` is gradient × activation),
averaged over the truth tokens. The *coarse* neurons of a prompt are those with ``score > adaptive_threshold ·
max score`` (max over all attributed layers). With ``refine`` the neurons kept are those coarse in more than
``refine_fraction`` of the prompts (the request's prompt plus, with ``use_paraphrases``, its paraphrases); without
it, the union (the reference's ``refine: false``). The ground truth is ``target_true`` when the request has one,
else the model's greedy continuation.

**Edit** (paper §5.1 "updating facts"). With ``E`` the **input** embedding matrix, ``o*`` the new target and
``o`` the model's greedy continuation of the prompt with as many tokens as the target, column ``i`` of ``W_out^l``
(math orientation) of every chosen neuron gets

    Δ = 2·E[o*] − 2·E[o]                  (single-token sides)
    Δ = Σ_t E[o*_t] − Σ_t E[o_t]          (multi-token sides: each token once, without the factor 2)

exactly as the reference's ``modify_weights(mode="edit")`` (each side independently). The delta is a dense update
that is zero outside the chosen columns. Several requests are attributed independently on the unedited model and
their column changes add up. ``E`` is a poor proxy for the output direction when the LM head is untied (Llama).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from kedit.arch import ArchAdapter, get_adapter, math_weight
from kedit.core.batching import check_conflicts, device_of
from kedit.core.context import EditContext
from kedit.core.keys import target_ids
from kedit.deltas import DenseUpdate, EditDelta
from kedit.deltas.ledger import compute_dtype
from kedit.hooks import trace
from kedit.methods.presets import preset_for
from kedit.methods.registry import register_method
from kedit.requests import EditRequest

__all__ = ["KNConfig", "attribute", "compute_kn", "edit_vector", "knowledge_neurons"]

log = logging.getLogger(__name__)


@dataclass
class KNConfig:
    """KN hyper-parameters (EasyEdit names in parentheses).

    Attributes:
        layers: layers whose neurons are attributed and may be edited; ``None`` = every layer (the paper).
        steps: Riemann steps ``m`` of the integrated gradients (``steps``, 20).
        batch_size: scaled copies per forward pass (``batch_size``, 20).
        adaptive_threshold: coarse neurons have a score above this fraction of the maximum (0.2).
        refine: keep the neurons shared by more than ``refine_fraction`` of the prompts (``refine``, false).
        refine_fraction: the sharing threshold ``p`` (0.4 in the paper's notation here; EasyEdit ``p``).
        use_paraphrases: attribute on the request's paraphrases too (needed for a meaningful ``refine``).
        max_neurons: keep at most this many neurons per request (highest mean score); 0 = no cap.
    """

    layers: tuple[int, ...] | None = None
    steps: int = 20
    batch_size: int = 20
    adaptive_threshold: float = 0.2
    refine: bool = False
    refine_fraction: float = 0.4
    use_paraphrases: bool = False
    max_neurons: int = 0


def _label(i: int, req: EditRequest) -> str:
    return f"request #{i}" + (f" (case {req.case_id})" if req.case_id is not None else "")


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    device = device_of(model)
    seq = list(ids)
    for _ in range(n):
        x = torch.tensor([seq], device=device)
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids) :]


def attribute(
    model,
    adapter: ArchAdapter,
    prompt_ids: Sequence[int],
    truth: Sequence[int],
    layers: Sequence[int],
    *,
    steps: int = 20,
    batch_size: int = 20,
) -> torch.Tensor:
    """Integrated-gradients scores ``[len(layers), d_k]`` (fp32) of the MLP intermediate neurons for
    ``P(truth | prompt)``, averaged over the truth tokens (teacher forced). See the module docstring."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be ≥ 1, got {steps}, {batch_size}")
    device = device_of(model)
    paths = [adapter.path("mlp_out", layer) for layer in layers]
    alphas = torch.arange(1, steps + 1, device=device, dtype=torch.float32) / steps
    # every (layer, alpha) pair is one row of the IG batch; each row patches one layer only
    plan = [(j, alphas[k]) for j in range(len(layers)) for k in range(steps)]
    total = None
    for t in range(len(truth)):
        ids = list(prompt_ids) + list(truth[:t])
        pos = len(ids) - 1
        ids_t = torch.tensor([ids], device=device)
        with torch.no_grad(), trace(model, paths, retain_input=True, retain_output=False) as tr:
            model(input_ids=ids_t, attention_mask=torch.ones_like(ids_t))
        base = torch.stack([tr[p].input[0, pos].float() for p in paths])  # [L, d_k]
        grad_sum = torch.zeros_like(base)
        for c in range(0, len(plan), batch_size):
            chunk = plan[c : c + batch_size]
            rows_of: dict[int, list[int]] = {}
            for r, (j, _) in enumerate(chunk):
                rows_of.setdefault(j, []).append(r)
            leaves = {}
            for j, rows in rows_of.items():
                a = torch.stack([chunk[r][1] for r in rows])[:, None] * base[j][None]
                leaves[j] = a.requires_grad_(True)
            by_path = {paths[j]: j for j in rows_of}

            def patch(name: str, inp: torch.Tensor, by_path=by_path, rows_of=rows_of, leaves=leaves, pos=pos):
                j = by_path.get(name)
                if j is None:
                    return None
                rows = torch.tensor(rows_of[j], device=inp.device)
                new = inp.clone()
                new[rows, pos] = leaves[j].to(inp.dtype)
                return new

            batch_ids = ids_t.expand(len(chunk), -1)
            with torch.enable_grad(), trace(model, list(by_path), retain_output=False, edit_input=patch):
                logits = model(input_ids=batch_ids, attention_mask=torch.ones_like(batch_ids)).logits
                probs = torch.softmax(logits[:, pos].float(), dim=-1)[:, truth[t]]
                grads = torch.autograd.grad(probs.sum(), [leaves[j] for j in rows_of])
            for j, g in zip(rows_of, grads):
                grad_sum[j] += g.sum(0)
        scores = base * grad_sum / steps
        total = scores if total is None else total + scores
    assert total is not None
    return total / len(truth)


def knowledge_neurons(scores: Sequence[torch.Tensor], config: KNConfig) -> list[tuple[int, int]]:
    """Coarse neurons per prompt (``score > threshold · max``), then refined / united over prompts.

    ``scores[p]`` is ``[L, d_k]``; returns ``(layer_position, neuron)`` pairs (indices into the attributed layers),
    ordered by decreasing mean score.
    """
    counts: Counter[tuple[int, int]] = Counter()
    for s in scores:
        top = float(s.max())
        if not top > 0:
            continue
        for j, i in torch.nonzero(s > config.adaptive_threshold * top).tolist():
            counts[(j, i)] += 1
    if config.refine:
        need = config.refine_fraction * len(scores)
        chosen = [n for n, c in counts.items() if c > need]
    else:
        chosen = list(counts)
    mean = torch.stack(list(scores)).mean(0)
    chosen.sort(key=lambda n: -float(mean[n]))
    if config.max_neurons > 0:
        chosen = chosen[: config.max_neurons]
    return chosen


def edit_vector(embed: torch.Tensor, new: Sequence[int], old: Sequence[int]) -> torch.Tensor:
    """The column change of the reference: ``2E[o*] − 2E[o]`` for single tokens, each token once otherwise
    (each side independently)."""
    E = embed.double() if embed.dtype == torch.float64 else embed.float()
    plus = 2 * E[new[0]] if len(new) == 1 else E[list(new)].sum(0)
    minus = 2 * E[old[0]] if len(old) == 1 else E[list(old)].sum(0)
    return plus - minus


def compute_kn(
    model, tok, requests: Sequence[EditRequest], config: KNConfig, ctx: EditContext | None = None
) -> EditDelta:
    """Locate knowledge neurons per request and rewrite their ``W_out`` columns. The model is left unchanged."""
    ctx = ctx or EditContext()
    if not requests:
        raise ValueError("no edit requests given")
    check_conflicts(requests, "KN")
    if not 0 < config.adaptive_threshold <= 1:
        raise ValueError(f"adaptive_threshold must be in (0, 1], got {config.adaptive_threshold}")
    adapter = get_adapter(model)
    n_layers = adapter.num_layers(model)
    if config.layers is not None and len(config.layers) == 0:
        raise ValueError("layers must name at least one layer (or be None for all layers)")
    layers = sorted({adapter.check_layer(model, layer) for layer in (config.layers or range(n_layers))})
    embed = adapter.module(model, "embed").weight.detach()
    d_out = {layer: math_weight(adapter.module(model, "mlp_out", layer)).shape for layer in layers}
    for layer, (d, _) in d_out.items():
        if embed.shape[1] != d:
            raise ValueError(
                f"layer {layer}: mlp_out writes {d} dims but the input embedding has {embed.shape[1]}"
            )
    # tokenise and validate everything before the (slow) attribution
    prepared = []
    for i, req in enumerate(requests):
        prompt_ids = tok(req.text, add_special_tokens=True)["input_ids"]
        try:
            new = target_ids(tok, req.target_new)
            truth = target_ids(tok, req.target_true) if req.target_true else None
        except ValueError as e:
            raise ValueError(f"{_label(i, req)}: {e}") from None
        prompts = [req.text] + (list(req.paraphrases) if config.use_paraphrases else [])
        prepared.append((req, prompt_ids, new, truth, prompts))

    columns: dict[int, dict[int, torch.Tensor]] = {layer: {} for layer in layers}
    diagnostics = []
    was_training = model.training
    model.eval()
    try:
        for i, (req, prompt_ids, new, truth, prompts) in enumerate(prepared):
            old = _greedy(model, prompt_ids, len(new))
            gt = truth if truth is not None else old
            scores = []
            for text in prompts:
                ids = tok(text, add_special_tokens=True)["input_ids"]
                scores.append(
                    attribute(
                        model, adapter, ids, gt, layers, steps=config.steps, batch_size=config.batch_size
                    )
                )
            neurons = knowledge_neurons(scores, config)
            if not neurons:
                raise ValueError(
                    f"{_label(i, req)}: KN found no knowledge neuron (all attribution scores ≤ 0)"
                )
            vec = edit_vector(embed, new, old)
            if not bool(vec.any()):
                log.warning(
                    "%s: the model already predicts %r; KN changes nothing", _label(i, req), req.target_new
                )
            for j, n in neurons:
                layer = layers[j]
                col = columns[layer]
                col[n] = col[n] + vec if n in col else vec.clone()
            diagnostics.append(
                {
                    "case_id": req.case_id,
                    "neurons": [[layers[j], n] for j, n in neurons],
                    "original_prediction": old,
                    "ground_truth": list(gt),
                }
            )
            ctx.report("kn", i + 1, len(requests))
    finally:
        model.train(was_training)

    updates = []
    for layer in layers:
        if not columns[layer]:
            continue
        d, d_k = d_out[layer]
        # on the edited weight's device (the embedding may live on another shard), fp32 (fp64 for fp64 weights)
        weight = adapter.module(model, "mlp_out", layer).weight
        D = torch.zeros(d, d_k, dtype=compute_dtype(weight.dtype), device=weight.device)
        for n, v in columns[layer].items():
            D[:, n] = v.to(D.device)
        updates.append(DenseUpdate.from_math(model, adapter.weight_name("mlp_out", layer), D))
    out = EditDelta.for_model(
        model,
        updates,
        method="kn",
        config={**asdict(config), "layers": layers},
        requests=[r.to_dict() for r in requests],
    )
    out.meta["diagnostics"] = diagnostics
    return out


def _presets(model) -> dict:
    return preset_for("kn", model)


register_method(
    "kn",
    config=KNConfig,
    compute=compute_kn,
    paper="Dai et al., Knowledge Neurons in Pretrained Transformers, ACL 2022",
    summary="integrated-gradients neuron attribution, then W_out columns += 2(E[o*] − E[o])",
    presets=_presets,
)
