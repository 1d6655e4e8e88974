"""Caption generation for CoCa: OpenCLIP's ``generate`` with the same arguments, defaults and tokens,
without transformers, and with a KV cache.

OpenCLIP builds its search from transformers pieces (``BeamSearchScorer``, logits processors and
warpers, stopping criteria). Their semantics are reproduced here, in particular those OpenCLIP
relies on: beam search scores raw logits (no log-softmax), beams are split into groups searched
independently (no diversity penalty), finished hypotheses are ranked by score / length, and
sampling stops a row at its EOS or at a pad token. Differences in *how*, not *what*:

* the next-token logits come from a ``decoder`` that keeps keys/values of past positions
  (``CoCa.decoder``), instead of re-running both text networks over the whole prefix each step;
* each image is encoded once, not once per beam;
* sampling decodes only the rows that have not finished.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

GENERATION_TYPES = ("beam_search", "top_k", "top_p")
SOT_TOKEN_ID, EOT_TOKEN_ID = 49406, 49407  # CLIP BPE's start/end of text, OpenCLIP's defaults
TokenIds = Union[int, Sequence[int], torch.Tensor]


# ----------------------------------------------------------------------------------------------
# Logits processors (transformers 4.55 semantics)
# ----------------------------------------------------------------------------------------------


def min_length(input_ids: torch.Tensor, scores: torch.Tensor, length: int, eos: torch.Tensor) -> torch.Tensor:
    """EOS impossible while the sequences are shorter than ``length`` (``MinLengthLogitsProcessor``)."""
    if input_ids.shape[-1] < length:
        eos_mask = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)
        return torch.where(eos_mask, -math.inf, scores)
    return scores


def repetition_penalty(input_ids: torch.Tensor, scores: torch.Tensor, penalty: float) -> torch.Tensor:
    """Scores of tokens already in the sequence divided (positive) or multiplied (negative) by ``penalty``."""
    if penalty == 1.0:
        return scores  # x / 1 and x * 1 are exact: transformers' result is the input
    score = torch.gather(scores, 1, input_ids)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return scores.scatter(1, input_ids, score)


def top_k_filter(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` best scores (ties at the k-th kept), the rest -inf (``TopKLogitsWarper``)."""
    if not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"`top_k` has to be a strictly positive integer, but is {top_k}")
    k = min(top_k, scores.size(-1))
    return scores.masked_fill(scores < torch.topk(scores, k)[0][..., -1, None], -math.inf)


def top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering as ``TopPLogitsWarper``: drop the least likely tokens whose cumulative
    probability is at most ``1 - top_p``, always keeping the most likely one."""
    top_p = float(top_p)
    if top_p < 0 or top_p > 1.0:
        raise ValueError(f"`top_p` has to be a float > 0 and < 1, but is {top_p}")
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = 0
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), -math.inf)


class MaxLengthCriteria:
    """Stop once sequences have ``max_length`` tokens (transformers' class of that name)."""

    def __init__(self, max_length: int):
        self.max_length = max_length

    def __call__(self, input_ids: torch.Tensor, scores=None) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), input_ids.shape[-1] >= self.max_length,
                          dtype=torch.bool, device=input_ids.device)


def _should_stop(criteria: Sequence[Callable], input_ids: torch.Tensor) -> bool:
    """Every row is done by some criterion (transformers' ``StoppingCriteriaList`` then ``all``)."""
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    for criterion in criteria:
        done = done | torch.as_tensor(criterion(input_ids, None), device=input_ids.device)
    return bool(done.all())


def _max_length(criteria: Sequence[Callable]) -> Optional[int]:
    return next((c.max_length for c in criteria if getattr(c, "max_length", None) is not None), None)


def _as_ids(ids: Optional[TokenIds], default: int, device) -> torch.Tensor:
    if ids is None:
        ids = default
    if isinstance(ids, int):
        ids = [ids]
    return torch.as_tensor(ids, device=device).reshape(-1)


# ----------------------------------------------------------------------------------------------
# Group beam search (transformers' BeamSearchScorer / BeamHypotheses, length_penalty=1, no early stop)
# ----------------------------------------------------------------------------------------------


class BeamHypotheses:
    """The ``num_beams`` best finished sequences of one (sample, group), scored by sum / length."""

    def __init__(self, num_beams: int):
        self.num_beams = num_beams
        self.beams: List[tuple] = []
        self.worst_score = 1e9

    def __len__(self) -> int:
        return len(self.beams)

    def add(self, hyp: torch.Tensor, sum_logprobs: float, generated_len: int) -> None:
        score = sum_logprobs / generated_len
        if len(self) < self.num_beams or score > self.worst_score:
            self.beams.append((score, hyp))
            if len(self) > self.num_beams:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, cur_len: int) -> bool:
        """Full, and no running beam can beat the worst kept one any more."""
        return len(self) >= self.num_beams and self.worst_score >= best_sum_logprobs / cur_len


def _beam_search(model, image_embs: torch.Tensor, *, sot: torch.Tensor, eos: torch.Tensor, pad: int,
                 num_beams: int, num_beam_groups: int, min_seq_len: int, repetition: float,
                 criteria: Sequence[Callable], use_cache: bool, device) -> torch.Tensor:
    batch = image_embs.shape[0]
    if not isinstance(num_beams, int) or num_beams <= 1:
        raise ValueError(f"`num_beams` has to be an integer strictly greater than 1, but is {num_beams}")
    if not isinstance(num_beam_groups, int) or num_beam_groups > num_beams or num_beams % num_beam_groups:
        raise ValueError(f"`num_beam_groups` has to be an integer smaller or equal than `num_beams` and "
                         f"`num_beams` has to be divisible by it, but is {num_beam_groups} with {num_beams} beams")
    group_size = num_beams // num_beam_groups
    eos_ids = set(eos.tolist())
    hyps = [BeamHypotheses(group_size) for _ in range(batch * num_beam_groups)]  # [sample * groups + group]
    done = [False] * len(hyps)
    max_length = _max_length(criteria)
    decoder = model.decoder(image_embs, num_beams, _capacity(model, max_length), use_cache)

    input_ids = torch.full((batch * num_beams, 1), int(sot[0]), dtype=torch.long, device=device)
    # Only the first beam of each group starts live, so a group's beams do not all pick the same token.
    beam_scores = torch.full((batch, num_beams), -1e9, dtype=torch.float, device=device)
    beam_scores[:, ::group_size] = 0
    beam_scores = beam_scores.view(-1)
    offsets = torch.arange(batch, device=device)[:, None] * num_beams  # [B, 1]
    while True:
        current_tokens = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
        reorder = torch.zeros(batch * num_beams, dtype=torch.long, device=device)
        logits = decoder(input_ids)  # [B * beams, V]
        vocab = logits.shape[-1]
        for group in range(num_beam_groups):
            start = group * group_size
            rows = (offsets + torch.arange(start, start + group_size, device=device)).view(-1)  # [B * gs]
            group_ids = input_ids[rows]
            scores = repetition_penalty(group_ids, min_length(group_ids, logits[rows], min_seq_len, eos), repetition)
            scores = (scores + beam_scores[rows, None]).view(batch, group_size * vocab)
            top_scores, top_tokens = torch.topk(scores, 2 * group_size, dim=1, largest=True, sorted=True)
            beam_from, top_tokens = top_tokens // vocab, top_tokens % vocab  # [B, 2 gs]
            new_scores, new_tokens, new_from = _process(
                hyps, done, group_ids, top_scores, top_tokens, beam_from, group, num_beam_groups, group_size,
                eos_ids, pad)
            beam_scores[rows] = new_scores
            input_ids[rows] = group_ids[new_from]
            current_tokens[rows] = new_tokens
            # the row (in the whole batch) each surviving beam continues
            sample = torch.div(new_from, group_size, rounding_mode="floor")
            reorder[rows] = num_beams * sample + start + new_from % group_size
        input_ids = torch.cat([input_ids, current_tokens[:, None]], dim=-1)
        decoder.reorder(reorder)
        if all(done) or _should_stop(criteria, input_ids):
            break
    return _finalize(hyps, done, input_ids, beam_scores, batch, num_beam_groups, group_size, max_length, pad,
                     int(eos[0]))


def _process(hyps, done, group_ids, top_scores, top_tokens, beam_from, group, num_groups, group_size, eos_ids, pad):
    """``BeamSearchScorer.process`` for one group: candidates ending in EOS become finished
    hypotheses (if ranked within the group size), the best ``group_size`` others continue."""
    batch = top_scores.shape[0]
    scores_list, tokens_list, from_list = top_scores.tolist(), top_tokens.tolist(), beam_from.tolist()
    next_scores = torch.zeros((batch, group_size), dtype=top_scores.dtype)
    next_tokens = torch.zeros((batch, group_size), dtype=torch.long)
    next_from = torch.zeros((batch, group_size), dtype=torch.long)
    cur_len = group_ids.shape[-1] + 1
    for b in range(batch):
        h = b * num_groups + group
        if done[h]:
            next_tokens[b, :] = pad  # a finished sample keeps decoding padding (its rows are unused)
            continue
        kept = 0
        for rank, (token, score, source) in enumerate(zip(tokens_list[b], scores_list[b], from_list[b])):
            row = b * group_size + source
            if token in eos_ids:
                if rank >= group_size:
                    continue
                hyps[h].add(group_ids[row].clone(), score, cur_len)
            else:
                next_scores[b, kept], next_tokens[b, kept], next_from[b, kept] = score, token, row
                kept += 1
            if kept == group_size:
                break
        done[h] = done[h] or hyps[h].is_done(max(scores_list[b]), cur_len)
    device = top_scores.device
    return next_scores.view(-1).to(device), next_tokens.view(-1).to(device), next_from.view(-1).to(device)


def _finalize(hyps, done, input_ids, beam_scores, batch, num_groups, group_size, max_length, pad, eos) -> torch.Tensor:
    """``BeamSearchScorer.finalize``: add the running beams, keep each sample's best hypothesis, and
    pad the batch (an EOS after every hypothesis shorter than the longest + 1, up to ``max_length``)."""
    scores = beam_scores.tolist()
    for h, beam_hyp in enumerate(hyps):
        if done[h]:
            continue
        for i in range(group_size):
            row = h * group_size + i
            beam_hyp.add(input_ids[row], scores[row], input_ids.shape[-1])
    best = []
    for b in range(batch):
        candidates = [beam for beam_hyp in hyps[b * num_groups:(b + 1) * num_groups] for beam in beam_hyp.beams]
        best.append(sorted(candidates, key=lambda x: x[0])[-1][1])
    lengths = [len(hyp) for hyp in best]
    width = max(lengths) + 1
    width = min(width, max_length) if max_length is not None else width
    out = input_ids.new_full((batch, width), pad)
    for i, hyp in enumerate(best):
        out[i, :lengths[i]] = hyp
        if lengths[i] < width:
            out[i, lengths[i]] = eos
    return out


# ----------------------------------------------------------------------------------------------
# Sampling (top-k / top-p), batched with per-row stopping
# ----------------------------------------------------------------------------------------------


def _sample(model, image_embs: torch.Tensor, text: torch.Tensor, *, seq_len: int, max_seq_len: int,
            temperature: float, warp: Callable, eos: torch.Tensor, pad: int, min_seq_len: int,
            repetition: float, criteria: Sequence[Callable], fixed_output_length: bool, use_cache: bool,
            device) -> torch.Tensor:
    max_length = _max_length(criteria)
    capacity = _capacity(model, max_length)
    # A window shorter than the sequences re-positions the prefix every step: only recomputation can do that.
    use_cache = use_cache and max_length is not None and max_seq_len >= capacity
    decoder = model.decoder(image_embs, 1, capacity, use_cache)
    out = text
    active = torch.arange(out.shape[0], device=device)  # rows the decoder holds, in its order
    while True:
        x = out[:, -max_seq_len:]
        cur_len = x.shape[1]
        finished = torch.isin(out[:, -1], eos) | (out[:, -1] == pad)
        sample = torch.full((out.shape[0], 1), pad, dtype=torch.long, device=device)
        if finished.all():
            if not fixed_output_length:
                break
        else:
            live = (~finished).nonzero().view(-1)
            if cur_len + 1 == seq_len:
                sample[live] = int(eos[0])  # the last position is always EOS: no need to score it
            else:
                if len(live) != len(active) or not torch.equal(live, active):
                    decoder.reorder(torch.searchsorted(active, live))  # drop rows that finished
                    active = live
                logits = decoder(x[live] if not use_cache else out[live])
                scores = repetition_penalty(x[live], min_length(x[live], logits, min_seq_len, eos), repetition)
                probs = F.softmax(warp(scores) / temperature, dim=-1)
                sample[live] = torch.multinomial(probs, 1)
        out = torch.cat([out, sample], dim=-1)
        if _should_stop(criteria, out):
            break
    return out


def max_sequence_length(model) -> int:
    """The longest token sequence (SOT included) both of CoCa's text networks take."""
    return min(model.cfg.text_cfg.context_length, model.cfg.multimodal_cfg.context_length)


def _capacity(model, max_length: Optional[int]) -> int:
    """Positions a decoding cache must hold: the text context, or less when the search stops sooner."""
    context = max_sequence_length(model)
    return min(max_length, context) if max_length is not None else context


def generate(
    self,
    image: torch.Tensor,
    text: Optional[torch.Tensor] = None,
    seq_len: int = 30,
    max_seq_len: int = 77,
    temperature: float = 1.,
    generation_type: str = "beam_search",
    top_p: float = 0.1,  # keep tokens in the 1 - top_p quantile
    top_k: int = 1,  # keeps the top_k most probable tokens
    pad_token_id: Optional[int] = None,
    eos_token_id: Optional[TokenIds] = None,
    sot_token_id: Optional[TokenIds] = None,
    num_beams: int = 6,
    num_beam_groups: int = 3,
    min_seq_len: int = 5,
    stopping_criteria: Optional[Sequence[Callable]] = None,
    repetition_penalty: float = 1.0,
    fixed_output_length: bool = False,  # if True output.shape == (batch_size, seq_len)
    device: Optional[Union[str, torch.device]] = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Caption token ids [B, T] (SOT first, EOS then padding), as ``open_clip.CoCa.generate``.

    ``generation_type`` is "beam_search" (``num_beams`` split into ``num_beam_groups`` searched
    independently; ``text`` and ``temperature`` are unused, as in OpenCLIP), "top_k" or "top_p"
    (sampling with ``torch.multinomial``, continuing ``text`` if given; with ``top_k=1`` greedy).
    ``stopping_criteria``: callables ``(input_ids, scores) -> bool tensor [B]`` (transformers'
    criteria work), defaulting to a maximum length of ``seq_len``. ``use_cache=False`` recomputes
    the prefix every step (OpenCLIP's way; same tokens, slower). Decode with ``tokenizer.decode``.
    """
    if seq_len <= min_seq_len:
        raise ValueError(f"seq_len ({seq_len}) must be larger than min_seq_len ({min_seq_len})")
    if generation_type not in GENERATION_TYPES:
        raise ValueError(f"generation_type has to be one of | {' | '.join(GENERATION_TYPES)} |, "
                         f"got {generation_type!r}")
    if min_seq_len < 0:
        raise ValueError(f"`min_length` has to be a non-negative integer, but is {min_seq_len}")
    if repetition_penalty <= 0:
        raise ValueError(f"`penalty` has to be a strictly positive float, but is {repetition_penalty}")
    device = torch.device(device) if device is not None else image.device
    image = image.to(device)
    sot = _as_ids(sot_token_id, SOT_TOKEN_ID, device)
    eos = _as_ids(eos_token_id, EOT_TOKEN_ID, device)
    pad = self.pad_id if pad_token_id is None else int(pad_token_id)
    criteria = list(stopping_criteria) if stopping_criteria is not None else [MaxLengthCriteria(seq_len)]
    longest = _max_length(criteria)
    if longest is not None and longest > max_sequence_length(self):
        raise ValueError(f"seq_len {longest} is longer than this model's text context "
                         f"({max_sequence_length(self)} tokens); OpenCLIP would fail once a caption got there")

    was_training = self.training
    self.eval()
    try:
        with torch.no_grad():
            _, image_embs = self._encode_image(image)
            if generation_type == "beam_search":
                out = _beam_search(self, image_embs, sot=sot, eos=eos, pad=pad, num_beams=num_beams,
                                   num_beam_groups=num_beam_groups, min_seq_len=min_seq_len,
                                   repetition=repetition_penalty, criteria=criteria, use_cache=use_cache,
                                   device=device)
                if fixed_output_length and out.shape[1] < seq_len:
                    out = torch.cat([out, out.new_full((out.shape[0], seq_len - out.shape[1]), pad)], dim=1)
                return out
            if generation_type == "top_p":
                top_p_filter(torch.zeros(1, 1), top_p)  # validate before decoding
                warp = lambda scores: top_p_filter(scores, top_p)  # noqa: E731
            else:
                top_k_filter(torch.zeros(1, 1), top_k)
                warp = lambda scores: top_k_filter(scores, top_k)  # noqa: E731
            if text is None:
                text = sot[:1].repeat(image.shape[0], 1)  # [B, 1]
            one_dim = text.dim() == 1
            text = text[None, :] if one_dim else text
            out = _sample(self, image_embs, text.to(device), seq_len=seq_len, max_seq_len=max_seq_len,
                          temperature=temperature, warp=warp, eos=eos, pad=pad, min_seq_len=min_seq_len,
                          repetition=repetition_penalty, criteria=criteria,
                          fixed_output_length=fixed_output_length, use_cache=use_cache, device=device)
            return out.squeeze(0) if one_dim else out
    finally:
        self.train(was_training)
