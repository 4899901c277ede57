"""Token-budget cache policies: what a layer group's cache keeps once a row holds more tokens than its budget.

Every policy here is one `TokenBudgetPolicy` with different knobs (one file per published method):
  sinks     the first tokens of the row, never evicted (StreamingLLM's attention sinks)
  recent    the most recent `recent` share of the budget, never evicted
  scored    rank the other tokens by attention accumulated over steps, decayed by `decay` per step, summed over
            the query heads and layers that read the group's latent (H2O, ZSMerge); else evict the oldest
  residual  a share of the non-recent budget kept as merge slots: an evicted token is averaged into the most
            similar one (count-weighted), whose attention logits get + log(count) (ZSMerge's compensated scores)
  scoring   how a prompt compressed at once is scored: "attention" (its last `prefill_queries` queries' decayed
            attention, the papers'), or "reconstruct" (the strongest attention each prompt token gets while the model
            reads the prompt again: LatentRuntime.score_by_reconstruction; query-agnostic, for prompts compressed
            whole, as `kvconvert eval` does)

The cache stays a dense run of slots [0, n) per row and group (the kernels read it unchanged); a slot's token
position, count, score and kind live beside it here. Cached rope keys are rotated already, so a slot carries its
position inside its key and slots can move freely. Rope keys from the latent (rope_from_latent) are rotated when
read, at the slot's `rot` position: its token's, or for a merge slot the count-weighted mean of its tokens' (the
merged latent is their count-weighted mean too; averaging rotated keys instead would also shrink the fast-turning
pairs, which this keeps whole). Decisions are made per row, so padded batches are exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ...cache_layout import Stream
from ...kernels import dequantize_streams, quantize_append_streams

SCORINGS = ("attention", "reconstruct")
RECONSTRUCT_CHUNK = 256  # prompt tokens read again per reconstruction step
RECONSTRUCT_POOL = 9  # a reconstruction score is the most of a slot's 9 nearest (a 5-digit number's 5 tokens and more)


@dataclass
class GroupState:
    """Per layer group, (B, S) each: token position (-1: a merged slot), count of tokens the slot stands for,
    accumulated attention, residual-slot flag, and the position rope keys from the latent rotate by (fp32: a merge
    slot's is its tokens' count-weighted mean)."""

    pos: torch.Tensor
    weight: torch.Tensor
    score: torch.Tensor
    residual: torch.Tensor
    rot: torch.Tensor

    def log_weights(self) -> torch.Tensor:
        return self.weight.log()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Everything kept per slot, in field order (what moves with a slot)."""
        return self.pos, self.weight, self.score, self.residual, self.rot


@dataclass
class TokenBudgetPolicy:
    budget: float  # < 1: a share of the context; >= 1: slots per row and layer group
    sinks: int = 0
    recent: float = 0.5
    residual: float = 0.0
    decay: float = 1.0
    scored: bool = True
    prefill_queries: int = 512  # prompt queries whose attention scores the prompt (older ones decay to nothing)
    scoring: str = "attention"  # or "reconstruct" (see the module's docstring)
    name: str = field(default="policy", init=False)
    states: list[GroupState] = field(default_factory=list, init=False, repr=False)
    held: bool = field(default=False, init=False)  # see hold()
    collecting: bool = field(default=False, init=False)  # a reconstruction reading: scores keep their maximum
    batched_step: bool = True  # a decode step evicts on the device for all rows at once (evict_one); False: per row
    opened: list[bool] = field(default_factory=list, init=False, repr=False)  # per row: its merge slots exist

    # ------------------------------------------------------------------ sizes
    def slots(self, context: int) -> int:
        n = math.ceil(self.budget * context) if self.budget < 1 else int(self.budget)
        need = self.sinks + 2 + (1 if self.residual else 0)
        if n < need:
            raise ValueError(f"a {self.name} budget of {n} slots is too small (at least {need})")
        return n

    def split(self, n: int) -> tuple[int, int]:
        """(recent, residual) slots of a budget of n."""
        recent = max(1, round(self.recent * n))
        residual = max(1, round(self.residual * (n - recent))) if self.residual else 0
        recent = min(recent, n - self.sinks - residual - 1)
        return recent, residual

    # ------------------------------------------------------------------ state
    def setup(self, groups: int, batch: int, capacity: int, n_slots: int, device) -> None:
        self.n_slots = n_slots
        self.opened = [False] * batch
        self.states = [
            GroupState(
                pos=torch.zeros(batch, capacity, dtype=torch.long, device=device),
                weight=torch.ones(batch, capacity, dtype=torch.float32, device=device),
                score=torch.zeros(batch, capacity, dtype=torch.float32, device=device),
                residual=torch.zeros(batch, capacity, dtype=torch.bool, device=device),
                rot=torch.zeros(batch, capacity, dtype=torch.float32, device=device),
            )
            for _ in range(groups)
        ]

    def hold(self) -> None:
        """Compress no more: what is cached stays as it is (merged slots keep their weights) and new tokens take
        fresh slots up to the capacity. kvpress's protocol, which compresses only the prompt. reset() undoes it."""
        self.held = True

    @property
    def observing(self) -> bool:
        """Whether a step's attention must be computed for this policy: it scores, and it may still compress (a
        held policy compresses no more until reset(), which clears the scores) or is collecting a reading."""
        return self.scored and (self.collecting or not self.held)

    def reset(self) -> None:
        self.held = False
        self.opened = [False] * len(self.opened)
        for s in self.states:
            s.pos.zero_(), s.weight.fill_(1.0), s.score.zero_(), s.residual.zero_(), s.rot.zero_()

    def appended(self, g: int, start: torch.Tensor, positions: torch.Tensor) -> None:
        """New tokens at slots start[b] + t with token positions positions (B, T): a fresh slot each."""
        st = self.states[g]
        B, T = positions.shape
        slots = start.long()[:, None] + torch.arange(T, device=start.device)
        rows = torch.arange(B, device=start.device)[:, None].expand(B, T)
        st.pos[rows, slots] = positions.long()
        st.weight[rows, slots] = 1.0
        st.score[rows, slots] = 0.0
        st.residual[rows, slots] = False
        st.rot[rows, slots] = positions.float()

    def observe(self, g: int, attention: torch.Tensor, steps: torch.Tensor) -> None:
        """attention (B, S'): the step's attention per slot (summed over heads, layers, decayed queries); steps (B,):
        tokens each row advanced (older scores decay by decay^steps)."""
        if self.scored:
            st = self.states[g]
            S = attention.shape[1]
            if self.collecting:
                torch.maximum(st.score[:, :S], attention, out=st.score[:, :S])
                return
            st.score.mul_((self.decay ** steps.float())[:, None])
            st.score[:, :S] += attention

    # ------------------------------------------------------------------ compression
    def compress(self, g: int, streams: list[Stream], lengths: list[int], seen: list[int]) -> list[int]:
        """Bring every row of group g back to the budget; returns the new slot counts. streams: all the group caches
        per slot (LatentCache.group_streams: the latent first, then the rope keys, then any key norms)."""
        if self.held:
            return list(lengths)
        st = self.states[g]
        out = []
        for b, n in enumerate(lengths):
            if n <= self.n_slots:
                out.append(n)
                continue
            out.append(self._compress_row(st, streams, b, n, seen[b]))
        return out

    def _compress_row(self, st: GroupState, streams: list[Stream], b: int, n: int, seen: int) -> int:
        recent, residual = self.split(self.n_slots)
        pos, res = st.pos[b, :n], st.residual[b, :n]
        protected = res | (pos >= seen - recent) | ((pos >= 0) & (pos < self.sinks))
        candidates = (~protected).nonzero()[:, 0]
        k = n - self.n_slots  # slots to free
        have_residual = int(res.sum())
        if residual and have_residual < residual:
            k += residual - have_residual  # the first compression also opens the merge slots
        if self.scored:
            order = st.score[b, candidates].argsort(stable=True)  # lowest accumulated attention first
        else:
            order = pos[candidates].argsort(stable=True)  # oldest first
        evict = candidates[order[:k]]
        keep = torch.ones(n, dtype=torch.bool, device=pos.device)
        keep[evict] = False
        if residual:
            self._merge(st, streams, b, evict, keep, residual - have_residual)
            self.opened[b] = True
        kept = keep.nonzero()[:, 0]
        self._move(st, streams, b, kept)
        return len(kept)

    def steady(self, lengths: list[int]) -> bool:
        """Whether this step's compression is evict_one's: some row holds one slot past the budget, none more, and
        (ZSMerge) every such row has its merge slots. Decided from host lists, without reading the device."""
        over = [b for b, n in enumerate(lengths) if n > self.n_slots]
        return (self.batched_step and not self.held and max(lengths) == self.n_slots + 1
                and (not self.residual or all(self.opened[b] for b in over)))

    def evict_one(self, g: int, streams: list[Stream], lens: torch.Tensor, seen: torch.Tensor) -> None:
        """compress() for a steady step (see steady), as tensor operations over all rows: no host sync, fixed shapes.
        lens (B,): the slots each row holds now (the cache's seq_lens, not changed here: rows over the budget lose one
        slot, which the caller subtracts); seen (B,): tokens each row has seen. Per row over the budget, the same
        choice as _compress_row (the lowest score, or the oldest, among the unprotected slots; the first on a tie),
        the same merge, and then the newest slot moves into the freed one instead of compacting the row (slot order
        means nothing to attention: a slot's position and weight travel with it). Rows within the budget write
        only into their last free slot, which nothing reads."""
        st, N = self.states[g], self.n_slots
        recent, residual = self.split(N)
        B, capacity = st.pos.shape
        rows = torch.arange(B, device=lens.device)
        active = lens > N
        last = (lens.long() - 1).clamp_min(0)
        pos, res = st.pos[:, : N + 1], st.residual[:, : N + 1]
        protected = res | (pos >= seen.long()[:, None] - recent) | ((pos >= 0) & (pos < self.sinks))
        if self.scored:
            key = st.score[:, : N + 1].masked_fill(protected, math.inf)
        else:
            key = pos.masked_fill(protected, torch.iinfo(pos.dtype).max)
        evict = torch.where(active, key.argmin(1), last)  # argmin: the first lowest, as the stable sort's first
        if residual:
            held = res.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :residual]  # merge slots, in order
            both = torch.cat([held, evict[:, None]], 1)
            gathered = [Stream(s.data.gather(1, both[..., None].expand(-1, -1, s.data.shape[2])),
                               None if s.scales is None else
                               s.scales.gather(1, both[..., None, None].expand(-1, -1, *s.scales.shape[2:])),
                               s.bits, s.group, s.width) for s in streams]
            values = dequantize_streams(gathered, residual + 1, torch.float32)
            mine, t = values[:, :residual], values[:, residual]
            pick = (mine @ t[:, :, None])[..., 0].argmax(1)  # the most similar merge slot (dot product)
            j = torch.where(active, held[rows, pick], capacity - 1)  # rows within the budget: a slot nobody reads
            wj, wt = st.weight[rows, j], st.weight[rows, evict]
            merged = (mine[rows, pick] * wj[:, None] + t * wt[:, None]) / (wj + wt)[:, None]
            st.rot[rows, j] = (st.rot[rows, j] * wj + st.rot[rows, evict] * wt) / (wj + wt)
            st.score[rows, j] = torch.maximum(st.score[rows, j], st.score[rows, evict])
            st.weight[rows, j] = wj + wt
            quantize_append_streams(streams, merged[:, None], j.to(torch.int32))
        for s in streams:  # the newest slot into the freed one (rows within the budget: onto itself)
            s.data[rows, evict] = s.data[rows, last]
            if s.scales is not None:
                s.scales[rows, evict] = s.scales[rows, last]
        for t in st.tensors():
            t[rows, evict] = t[rows, last]

    def _merge(self, st, streams, b, evict, keep, opening: int) -> None:
        """Average the evicted tokens into residual slots (count-weighted). The first compression opens the merge
        slots: the evicted tokens, in position order, split into `opening` runs, each averaged into its first slot."""
        values = self._values(streams, b)
        w = st.weight[b]
        evict = evict[st.pos[b, evict].argsort()]
        touched: list[int] = []
        if opening:
            for run in torch.tensor_split(evict, opening):
                if not run.numel():
                    continue
                slot = run[0]
                total = w[run].sum()
                values[slot] = (values[run] * w[run, None]).sum(0) / total
                st.rot[b, slot] = (st.rot[b, run] * w[run]).sum() / total
                st.weight[b, slot], st.score[b, slot] = total, st.score[b, run].max()
                st.pos[b, slot], st.residual[b, slot] = -1, True
                keep[slot] = True
                touched.append(int(slot))
        else:
            slots = st.residual[b].nonzero()[:, 0]
            for t in evict.tolist():
                j = slots[(values[slots] @ values[t]).argmax()]  # the most similar merge slot (dot product)
                wj, wt = st.weight[b, j].clone(), w[t].clone()
                values[j] = (values[j] * wj + values[t] * wt) / (wj + wt)
                st.rot[b, j] = (st.rot[b, j] * wj + st.rot[b, t] * wt) / (wj + wt)
                st.weight[b, j] = wj + wt
                st.score[b, j] = torch.maximum(st.score[b, j], st.score[b, t])
                touched.append(int(j))
        # Re-quantize only the slots that changed: a round trip through the quantizer is not exact.
        touched_slots = torch.tensor(sorted(set(touched)), dtype=torch.long, device=values.device)
        self._store(streams, b, touched_slots, values[touched_slots])

    @staticmethod
    def _values(streams: list[Stream], b: int) -> torch.Tensor:
        """Row b's slots as values (S, Σ widths) in fp32: the streams' values side by side."""
        row = [s.rows(slice(b, b + 1)) for s in streams]
        return dequantize_streams(row, streams[0].data.shape[1], torch.float32)[0]

    @staticmethod
    def _store(streams: list[Stream], b: int, slots: torch.Tensor, values: torch.Tensor) -> None:
        row = [s.rows(slice(b, b + 1)) for s in streams]
        for j, v in zip(slots.tolist(), values):
            quantize_append_streams(row, v[None, None], torch.tensor([j], dtype=torch.int32, device=values.device))

    @staticmethod
    def _move(st: GroupState, streams: list[Stream], b: int, kept: torch.Tensor) -> None:
        """Compact row b: the kept slots, in order, to [0, len(kept)). Codes and scales move as they are (exact)."""
        n = len(kept)
        for s in streams:
            s.data[b, :n] = s.data[b, kept]
            if s.scales is not None:
                s.scales[b, :n] = s.scales[b, kept]
        for t in st.tensors():
            t[b, :n] = t[b, kept]
