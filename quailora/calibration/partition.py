"""Split decoder layers across workers once the Grams exist (each layer's solve is independent)."""

from __future__ import annotations

from quailora.errors import QuailoraInputError


def partition_layers(layers: list[int], world_size: int) -> list[list[int]]:
    """Contiguous, balanced chunks in the given order: sizes differ by at most one, the first workers get
    the extra layers; always ``world_size`` lists (some empty if there are fewer layers than workers)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise QuailoraInputError(f"world_size must be a positive int, got {world_size!r}")
    if len(set(layers)) != len(layers):
        raise QuailoraInputError(f"layers must be distinct, got {list(layers)}")
    size, extra = divmod(len(layers), world_size)
    chunks, start = [], 0
    for rank in range(world_size):
        stop = start + size + (rank < extra)
        chunks.append(list(layers[start:stop]))
        start = stop
    return chunks
