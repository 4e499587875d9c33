"""Split a job's parameters over S parameter-server shards, balanced by bytes.

Pure logic. The tensors are laid end to end; the byte stream is cut at
``k * total / S``. A tensor no larger than one share goes whole to the shard
its middle falls in; a larger one is split by rows (its first dimension) at
the cuts inside it. Every worker and the SDK compute the same partition from
the same layout, so nothing about it needs to travel.
"""
from __future__ import annotations

import dataclasses

import torch

from psgrid.codec import Layout


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of tensor ``tensor``, held by one shard as ``name``."""

    tensor: str
    start: int
    stop: int
    whole: bool

    @property
    def name(self) -> str:
        return self.tensor if self.whole else f"{self.tensor}#{self.start}:{self.stop}"


@dataclasses.dataclass(frozen=True)
class Partition:
    """Which pieces of which tensors each shard holds, and each shard's layout."""

    pieces: tuple[tuple[Piece, ...], ...]
    layouts: tuple[Layout, ...]

    @property
    def shards(self) -> int:
        return len(self.pieces)

    def nbytes(self) -> list[int]:
        return [sum(m.nbytes for m in layout.tensors) for layout in self.layouts]


def _rows(shape: tuple[int, ...]) -> int:
    return shape[0] if shape else 1


def partition(layout: Layout, shards: int) -> Partition:
    """Partition ``layout``'s tensors over ``shards`` shards (1 = everything on one)."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    total = sum(m.nbytes for m in layout.tensors)
    share = total / shards if total else 1.0
    pieces: list[list[Piece]] = [[] for _ in range(shards)]
    offset = 0
    for m in layout.tensors:
        start_byte, end_byte = offset, offset + m.nbytes
        offset = end_byte
        rows = _rows(m.shape)
        if shards == 1 or m.nbytes <= share or rows <= 1:
            middle = (start_byte + end_byte) / 2
            pieces[min(shards - 1, int(middle / share))].append(Piece(m.name, 0, rows, True))
            continue
        row_bytes = m.nbytes / rows
        cuts = [0]
        for k in range(1, shards):
            row = round((k * share - start_byte) / row_bytes)
            if 0 < row < rows and row > cuts[-1]:
                cuts.append(row)
        cuts.append(rows)
        for a, b in zip(cuts, cuts[1:]):
            shard = min(shards - 1, int((start_byte + (a + b) / 2 * row_bytes) / share))
            pieces[shard].append(Piece(m.name, a, b, whole=(a, b) == (0, rows)))
    metas = {m.name: m for m in layout.tensors}
    layouts = tuple(
        Layout.of((p.name, metas[p.tensor].dtype, (p.stop - p.start, *metas[p.tensor].shape[1:])
                   if metas[p.tensor].shape else ())
                  for p in shard_pieces)
        for shard_pieces in pieces
    )
    return Partition(tuple(tuple(p) for p in pieces), layouts)


def piece_view(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The part of a full tensor that ``piece`` covers."""
    return tensor if piece.whole or tensor.dim() == 0 else tensor[piece.start : piece.stop]


def gather(part: Partition, shard_tensors: list[dict[str, torch.Tensor]],
           full: dict[str, torch.Tensor]) -> None:
    """Copy every shard's pieces into the matching rows of the full tensors."""
    for pieces, tensors in zip(part.pieces, shard_tensors):
        for piece in pieces:
            piece_view(full[piece.tensor], piece).copy_(tensors[piece.name])


def covers(part: Partition, layout: Layout) -> bool:
    """True when the pieces cover every row of every tensor exactly once."""
    rows: dict[str, list[tuple[int, int]]] = {}
    for pieces in part.pieces:
        for p in pieces:
            rows.setdefault(p.tensor, []).append((p.start, p.stop))
    for m in layout.tensors:
        spans = sorted(rows.get(m.name, []))
        if not spans or spans[0][0] != 0 or spans[-1][1] != _rows(m.shape):
            return False
        if any(a[1] != b[0] for a, b in zip(spans, spans[1:])):
            return False
    return True


def assemble(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Whole tensors from every shard's pieces, using only the pieces' names.

    A piece named ``t#a:b`` holds rows a..b of ``t``; any other name is a whole
    tensor. Tensors come out in the order their first piece appears.
    """
    rows: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for part in parts:
        for name, tensor in part.items():
            base, sep, span = name.rpartition("#")
            start = span.split(":")[0] if sep else ""
            if sep and start.isdigit():
                rows.setdefault(base, []).append((int(start), tensor))
            else:
                rows.setdefault(name, []).append((0, tensor))
    out = {}
    for name, pieces in rows.items():
        pieces.sort(key=lambda p: p[0])
        out[name] = pieces[0][1] if len(pieces) == 1 else torch.cat([t for _, t in pieces])
    return out
