"""Per-row sums of one (reference, other) pair, from which every comparison metric is derived.

`row_stats(ref, other)` reads both tensors once, in row chunks (bounded temporaries, also for [1304, 92544]
logits), and keeps per row: sum r^2, e^2, d^2, r*e, |d| (d = other - ref), max |d| and its first column,
max |other|, the non-finite counts of each side and whether a value is finite on one side only. The global
metrics, the metrics of any row subset (position classes, image rows) and the per-row errors are sums over
rows of those (`RowStats.metrics`, `.by_class`, `.row_errors`), with the conventions of
`parity.compare.metrics` (whose functions are implemented through this module).

Numerics. A float32 (or bf16/fp16) pair is computed in float32, in ~10 passes over each row chunk while it
is in cache, then kept in float64: sums of squares are float32 products summed by torch's cascade summation
(relative error ~1e-7 per row); sum r*e is (sum r^2 + sum e^2 - sum d^2) / 2, which is accurate to ~2e-7 of
|r| |e| where |r|, |e| are within a few times of each other - other rows are summed in float64; max |other| is
the float32 square root of max other^2 taken in float64 (exact: x -> fl32(x^2) is injective on float32).
max |d| is exact: the float32 difference is the correctly rounded float64 one and rounding is monotone, so
the float64 maximum lies in the column blocks holding the float32 maximum, where it is found in float64
(first column). A row is recomputed in float64 with `metrics.compare`'s masking whenever float32 could be
wrong: a non-finite sum or maximum (non-finite inputs, an overflowing square), a sum that underflows
(non-zero but below 2^-80, or zero while the row is not all zero). When either input is float64 (the
float64 noise floor), everything is computed in float64. tests/test_rowstats.py checks all of it against
the float64 implementation this replaced (relative differences ~1e-7; cosines ~1e-8 absolute).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

EPS = 1e-30

# Per-tensor elements of one row chunk (2 MiB of float32): the passes over a chunk stay in cache.
_CHUNK_ELEMS = 1 << 19
# Rows per group of the per-tensor work after the passes (exact max |d|, float64 recomputation).
_GROUP_ELEMS = 1 << 22
# Column block of the max |d| search (block maxima in the pass, then the row's blocks in float64).
_BLOCK = 64
# A float32 sum of squares below this (and above 0) may have lost relative precision to underflow.
_TINY32 = 2.0 ** -80
# A float32 max e^2 below this (and above 0) is too close to the subnormal range to give max |e| back exactly.
_TINY_MAX32 = 2.0 ** -100

_FLOAT_FIELDS = ("sr2", "se2", "sd2", "sre", "sad", "max_d", "max_e")
_INT_FIELDS = ("arg_d", "nf_ref", "nf_other")
_CLASS_KEYS = ("rel_l2", "max_abs", "cosine", "nonfinite_ref", "nonfinite_eng")


@dataclass
class RowStats:
    """Per-row sums of one (ref, other) pair; every vector is [rows].

    The sums cover the entries that are finite on both sides (as `metrics.compare` masks them); `max_e` is
    max |other| over *all* entries of the row (NaN if the row has a NaN), `mismatch` flags a row where a value
    is finite on one side and not on the other.
    """

    cols: int
    sr2: torch.Tensor      # float64: sum ref^2
    se2: torch.Tensor      # float64: sum other^2
    sd2: torch.Tensor      # float64: sum (other - ref)^2
    sre: torch.Tensor      # float64: sum ref * other
    sad: torch.Tensor      # float64: sum |other - ref|
    max_d: torch.Tensor    # float64: max |other - ref| (exact)
    arg_d: torch.Tensor    # int64: first column of max_d
    max_e: torch.Tensor    # float64: max |other| over all entries, NaN-propagating
    nf_ref: torch.Tensor   # int64: non-finite entries of ref
    nf_other: torch.Tensor  # int64: non-finite entries of other
    mismatch: torch.Tensor  # bool: a value finite on one side only

    @property
    def rows(self) -> int:
        return int(self.sr2.numel())

    # ---- metrics -------------------------------------------------------------------------------------------
    def metrics(self, rows: torch.Tensor | None = None) -> dict[str, Any]:
        """`metrics.compare(ref[rows], other[rows])` (all rows when None); `max_abs_row` counts within `rows`."""

        def sel(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        sd2 = sel(self.sd2)
        n = int(sd2.numel())
        ref_norm = math.sqrt(float(sel(self.sr2).sum()))
        eng_norm = math.sqrt(float(sel(self.se2).sum()))
        diff_norm = math.sqrt(float(sd2.sum()))
        if diff_norm == 0.0:
            rel = 0.0
        else:
            rel = diff_norm / ref_norm if ref_norm > 0.0 else math.inf
        if ref_norm == 0.0 and eng_norm == 0.0:
            cos = 1.0
        elif ref_norm == 0.0 or eng_norm == 0.0:
            cos = 0.0
        else:  # divide one norm at a time: a product of two tiny norms underflows
            cos = float(sel(self.sre).sum()) / ref_norm / eng_norm
            cos = max(-1.0, min(1.0, cos))
        if n and self.cols:
            md = sel(self.max_d)
            row = int(torch.argmax(md))  # first row of the maximum: the flat argmax's row
            col = int(sel(self.arg_d)[row])
            max_abs = float(md[row])
            mean_abs = float(sel(self.sad).sum()) / (n * self.cols)
        else:
            row = col = 0
            max_abs = mean_abs = 0.0
        nf_r, nf_e = int(sel(self.nf_ref).sum()), int(sel(self.nf_other).sum())
        out = {
            "cosine": cos,
            "rel_l2": rel,
            "max_abs": max_abs,
            "max_abs_row": row,
            "max_abs_col": col,
            "mean_abs": mean_abs,
            "ref_norm": ref_norm,
            "nonfinite_ref": nf_r,
            "nonfinite_eng": nf_e,
        }
        if (nf_r or nf_e) and bool(sel(self.mismatch).any()):
            # a value that is finite on one side and not on the other is an infinite error
            out["rel_l2"] = math.inf
            out["cosine"] = math.nan
        return out

    def by_class(self, classes: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        """`metrics.by_class`: metrics per row class; classes with no rows are left out."""
        out = {}
        for name, rows in classes.items():
            if rows.numel() == 0 or not bool(rows.any()):
                continue
            m = self.metrics(rows)
            out[name] = {k: m[k] for k in _CLASS_KEYS}
            out[name]["rows"] = int(rows.sum())
        return out

    def row_errors(self) -> torch.Tensor:
        """`metrics.row_errors`: per-row relative L2 error (float64 [rows]); one-sided non-finite rows are inf."""
        num = self.sd2.sqrt()
        den = self.sr2.sqrt()
        # rows are judged against the tensor's typical row norm, so a near-zero row does not explode
        scale = torch.clamp(den, min=float(den.mean()) * 1e-3 + EPS)
        err = num / scale
        return torch.where(self.mismatch, torch.full_like(err, math.inf), err)

    # ---- storage -------------------------------------------------------------------------------------------
    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}/{k}": getattr(self, k).contiguous() for k in _FLOAT_FIELDS + _INT_FIELDS}
        out[f"{prefix}/mismatch"] = self.mismatch.to(torch.uint8).contiguous()
        out[f"{prefix}/cols"] = torch.tensor([self.cols], dtype=torch.int64)
        return out

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor], prefix: str) -> "RowStats":
        kw: dict[str, Any] = {k: d[f"{prefix}/{k}"].to(torch.float64) for k in _FLOAT_FIELDS}
        kw.update({k: d[f"{prefix}/{k}"].to(torch.int64) for k in _INT_FIELDS})
        kw["mismatch"] = d[f"{prefix}/mismatch"].to(torch.bool)
        kw["cols"] = int(d[f"{prefix}/cols"].reshape(-1)[0])
        return cls(**kw)

    @staticmethod
    def prefixes(d: dict[str, torch.Tensor]) -> list[str]:
        """The prefixes stored in a `to_tensors` dict (in first-seen order)."""
        return list(dict.fromkeys(k.rsplit("/", 1)[0] for k in d if k.endswith("/cols")))


# ---- computation ---------------------------------------------------------------------------------------------
def as_rows(t: torch.Tensor) -> torch.Tensor:
    """The [rows, cols] view `metrics.compare` uses: 0-d -> [1, 1], 1-D [n] -> [n, 1], [n, ...] -> [n, prod]."""
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.shape[0] == 0:
        return t.reshape(0, math.prod(t.shape[1:]))
    return t.reshape(t.shape[0], -1)


def row_stats(ref: torch.Tensor, other: torch.Tensor) -> RowStats:
    """Per-row sums of `other` against `ref` (same number of elements; 1-D or [rows, ...])."""
    return row_stats_multi(ref, [other])[0]


def row_stats_multi(ref: torch.Tensor, others: Sequence[torch.Tensor]) -> list[RowStats]:
    """`row_stats(ref, o)` for every `o`, reading `ref` once: each row chunk of `ref` is used by all pairs
    while it is in cache, and its sum of squares is computed once per compute dtype."""
    r_all = as_rows(ref)
    n, cols = r_all.shape
    o_all = []
    for o in others:
        o = o.detach()
        if o.numel() != r_all.numel():
            raise ValueError(f"row_stats: shapes {tuple(ref.shape)} and {tuple(o.shape)} differ")
        o_all.append(o.reshape(r_all.shape))
    if n == 0 or cols == 0:
        return [_empty(n, cols) for _ in o_all]
    step = max(1, _CHUNK_ELEMS // cols)
    dts = [_compute_dtype(r_all.dtype, o.dtype) for o in o_all]
    # per compute dtype: sum r^2 of every row and two chunk-sized temporaries
    sr2 = {dt: torch.empty(n, dtype=dt) for dt in set(dts)}
    bufs = {dt: (torch.empty(min(step, n), cols, dtype=dt), torch.empty(min(step, n), cols, dtype=dt))
            for dt in set(dts)}
    passes = [_Pass(n, cols, dt) for dt in dts]
    for s in range(0, n, step):
        sl = slice(s, min(s + step, n))
        k = sl.stop - s
        r_dt = {}
        for dt in sr2:  # the reference chunk in each compute dtype, and its sum of squares
            r_dt[dt] = _cast(r_all[sl], dt)
            torch.sum(torch.square(r_dt[dt], out=bufs[dt][1][:k]), 1, out=sr2[dt][sl])
        for o, p, dt in zip(o_all, passes, dts):
            p.chunk(r_dt[dt], _cast(o[sl], dt), bufs[dt][0][:k], bufs[dt][1][:k], sl)
    group = max(1, _GROUP_ELEMS // cols)
    return [p.finish(r_all, o, sr2[dt], group) for o, p, dt in zip(o_all, passes, dts)]


def _compute_dtype(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    low = (torch.float32, torch.float16, torch.bfloat16)
    return torch.float32 if a in low and b in low else torch.float64


def _cast(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    if t.dtype == dt and t.is_contiguous():
        return t
    return t.to(dt).contiguous()


def _empty(n: int, cols: int) -> RowStats:
    f = {k: torch.zeros(n, dtype=torch.float64) for k in _FLOAT_FIELDS}
    i = {k: torch.zeros(n, dtype=torch.int64) for k in _INT_FIELDS}
    return RowStats(cols=cols, mismatch=torch.zeros(n, dtype=torch.bool), **f, **i)


class _Pass:
    """The full-size passes of one pair, chunk by chunk, into per-row vectors in the compute dtype; then
    `finish` derives everything else once per tensor (so small ops do not repeat per chunk).

    Per chunk: d = e - r; e^2 (its sum and maximum); |d| (its sum and column-block maxima); sum d^2. sum r*e
    is not a pass of its own: it is (sum r^2 + sum e^2 - sum d^2) / 2 wherever that is accurate (|e| and |r|
    within a few times of each other); other rows are summed in float64 in `finish`."""

    def __init__(self, n: int, cols: int, dt: torch.dtype):
        self.dt = dt
        self.v = torch.empty(5, n, dtype=dt)  # sd2, se2, sad, max e^2 (float32) or max e and min e (float64)
        self.bd = _Blocks(n, cols, dt)        # max |d| per column block

    def chunk(self, r: torch.Tensor, e: torch.Tensor, dbuf: torch.Tensor, sbuf: torch.Tensor, sl: slice) -> None:
        sd2, se2, sad, emax, emin = self.v[:, sl]
        d = torch.sub(e, r, out=dbuf)
        e2 = torch.square(e, out=sbuf)
        torch.sum(e2, 1, out=se2)
        if self.dt == torch.float64:
            torch.amax(e, 1, out=emax)
            torch.amin(e, 1, out=emin)
        else:  # max |e| from max e^2: x -> fl(x^2) is injective on float32 (normal range), see finish
            torch.amax(e2, 1, out=emax)
        a = d.abs_()
        torch.sum(a, 1, out=sad)
        self.bd.amax(a, sl)
        torch.sum(a.square_(), 1, out=sd2)

    def finish(self, r: torch.Tensor, e: torch.Tensor, sr2: torch.Tensor, group: int) -> RowStats:
        n, cols = r.shape
        sd2, se2, sad, emax, emin = self.v
        bd = self.bd.all()
        m = bd.amax(1)
        exact = self.dt == torch.float64
        ok = torch.isfinite(torch.stack([sr2, sd2, se2, sad, m] + ([emax, emin] if exact else [emax]))).all(0)
        if not exact:  # float32 sums: also recompute what underflow may have spoiled
            sq = torch.stack([sr2, se2, sd2])
            ok &= ~((sq > 0) & (sq < _TINY32)).any(0)
            ok &= ~((emax > 0) & (emax < _TINY_MAX32))  # max e^2 near subnormal: not invertible
            ok &= ~((sd2 == 0) & (m > 0))
            for s2, x in ((sr2, r), (se2, e)):  # a zero sum of a row that is not all zero
                z = (ok & (s2 == 0)).nonzero().flatten()
                if z.numel():
                    ok[z] = ~x[z].ne(0).any(1)
        f = {"sr2": sr2, "se2": se2, "sd2": sd2}
        f = {k: v.to(torch.float64, copy=True) for k, v in f.items()}  # (sr2 is shared by the pairs)
        if exact:
            f["max_e"] = torch.maximum(emax, emin.neg())
        else:  # |x| = fl32(sqrt(fl32(x^2))) with a correctly rounded float64 square root (checked on every float32
            # of [1, 4), so on every binade, in tests/test_rowstats.py)
            f["max_e"] = emax.to(torch.float64).sqrt_().to(torch.float32).to(torch.float64)
        # sum r*e by polarisation: its absolute error is ~eps * (sr2 + se2 + sd2) / 2, at most ~2 eps |r| |e|
        # where (sr2 + se2 + sd2) <= 4 |r| |e|; elsewhere (very different norms) it is summed in float64
        sre = (f["sr2"] + f["se2"] - f["sd2"]) / 2
        far = (ok & (f["sr2"] + f["se2"] + f["sd2"] > 4 * (f["sr2"] * f["se2"]).sqrt())).nonzero().flatten()
        for s in range(0, far.numel(), group):
            rows = far[s:s + group]
            sre[rows] = (r[rows].to(torch.float64) * e[rows].to(torch.float64)).sum(1)
        # max |d|: the exact (float64) maximum lies in the blocks whose float32 maximum is the row's
        max_d = torch.zeros(n, dtype=torch.float64)
        arg_d = torch.zeros(n, dtype=torch.int64)
        live = (ok & (m > 0)).nonzero().flatten()
        for s in range(0, live.numel(), group):
            rows = live[s:s + group]
            max_d[rows], arg_d[rows] = _exact_max(r, e, rows, bd[rows] == m[rows][:, None])
        # a float32 sum of |d| may round above its bound cols * max |d| (then mean_abs > max_abs): clamp it
        f["sad"] = torch.minimum(sad.to(torch.float64), max_d * cols)
        stats = RowStats(cols=cols, sre=sre, max_d=max_d, arg_d=arg_d, mismatch=torch.zeros(n, dtype=torch.bool),
                         nf_ref=torch.zeros(n, dtype=torch.int64), nf_other=torch.zeros(n, dtype=torch.int64), **f)
        bad = (~ok).nonzero().flatten()
        for s in range(0, bad.numel(), group):  # float64 with metrics.compare's masking
            rows = bad[s:s + group]
            for key, value in _masked64(r[rows], e[rows]).items():
                getattr(stats, key)[rows] = value
        return stats


class _Blocks:
    """Per row, the maximum of each block of `_BLOCK` consecutive columns (the last one possibly shorter)."""

    def __init__(self, n: int, cols: int, dt: torch.dtype):
        self.full = cols // _BLOCK
        self.main = torch.empty(n, self.full, dtype=dt)
        self.tail = torch.empty(n, 1 if cols % _BLOCK else 0, dtype=dt)

    def amax(self, x: torch.Tensor, sl: slice) -> None:
        b = self.full * _BLOCK
        if self.full:
            torch.amax(x[:, :b].unflatten(1, (self.full, _BLOCK)), 2, out=self.main[sl])
        if self.tail.shape[1]:
            torch.amax(x[:, b:], 1, keepdim=True, out=self.tail[sl])

    def all(self) -> torch.Tensor:
        if not self.tail.shape[1]:
            return self.main
        return torch.cat([self.main, self.tail], 1) if self.full else self.tail


def _exact_max(r: torch.Tensor, e: torch.Tensor, rows: torch.Tensor,
               blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `rows`: max |e - r| in float64 over the column blocks that `blocks` [rows, blocks] marks,
    and its first column."""
    cols = r.shape[1]
    lanes = torch.arange(_BLOCK)
    one = blocks.sum(1) == 1
    if bool(one.all()):  # the usual case: one block per row
        idx = (blocks.to(torch.uint8).argmax(1)[:, None] * _BLOCK + lanes).clamp_max(cols - 1)
        if rows.numel() == r.shape[0]:  # every row, in order
            rv, ev = r.gather(1, idx), e.gather(1, idx)
        else:
            flat = rows[:, None] * cols + idx
            rv, ev = r.take(flat), e.take(flat)
        dv = (ev.to(torch.float64) - rv.to(torch.float64)).abs_()
        best, at = dv.max(1)  # a clamped duplicate of the last column comes after it: first wins
        return best, idx.gather(1, at[:, None]).flatten()
    if bool(one.any()):
        best = torch.empty(rows.numel(), dtype=torch.float64)
        first = torch.empty(rows.numel(), dtype=torch.int64)
        for sel in (one, ~one):
            best[sel], first[sel] = _exact_max(r, e, rows[sel], blocks[sel])
        return best, first
    br, bb = blocks.nonzero(as_tuple=True)          # (row, block) pairs
    idx = bb[:, None] * _BLOCK + lanes
    valid = idx < cols
    idx = idx.clamp_max(cols - 1)
    flat = rows[br][:, None] * cols + idx
    dv = torch.where(valid, (e.take(flat).to(torch.float64) - r.take(flat).to(torch.float64)).abs(), -1.0)
    k = rows.numel()
    owner = br[:, None].expand_as(dv).reshape(-1)
    best = torch.full((k,), -1.0, dtype=torch.float64).scatter_reduce(0, owner, dv.reshape(-1), "amax")
    cand = torch.where(dv == best[br][:, None], idx, cols)
    first = torch.full((k,), cols, dtype=torch.int64).scatter_reduce(0, owner, cand.reshape(-1), "amin")
    return best, first


def _masked64(r: torch.Tensor, e: torch.Tensor) -> dict[str, torch.Tensor]:
    """Row sums in float64 with `metrics.compare`'s masking (entries finite on both sides)."""
    r = r.to(torch.float64)
    e = e.to(torch.float64)
    fr, fe = torch.isfinite(r), torch.isfinite(e)
    out = {"nf_ref": (~fr).sum(1), "nf_other": (~fe).sum(1), "mismatch": (fr != fe).any(1),
           "max_e": e.abs().amax(1)}
    fin = fr & fe
    rz = torch.where(fin, r, 0.0)
    ez = torch.where(fin, e, 0.0)
    d = ez - rz
    out.update(sr2=(rz * rz).sum(1), se2=(ez * ez).sum(1), sre=(rz * ez).sum(1), sd2=(d * d).sum(1))
    ad = d.abs()
    out["sad"] = ad.sum(1)
    out["max_d"], out["arg_d"] = ad.max(1)
    return out
