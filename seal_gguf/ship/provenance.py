"""How the scales folded into a GGUF were learned (the recipe), and the context it runs with.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from seal_gguf.constants import GGUFKeys, ScalesMeta
from seal_gguf.errors import InputError
from seal_gguf.fileio import sha256_file
from seal_gguf.gguffile.metadata import GGUFFacts

# The context a server or Ollama gets when nothing says which: the KV cache of a 128K-context
# model would take many GB for a context nobody asked for.
MAX_DEFAULT_CTX = 8192
@dataclass(frozen=True)
class Recipe:
    """The provenance a scales file records (seal-gguf train writes it), and which file it came from."""

    source: Path
    metadata: dict[str, str]

    @property
    def length(self) -> int | None:
        value = self.metadata.get(ScalesMeta.LENGTH, "")
        return int(value) if value.isdigit() and int(value) > 0 else None


def bundled_candidates() -> list[Path]:
    from seal_gguf.bundled import BUNDLED, bundled_scales

    found = []
    for granularity in BUNDLED:
        try:
            found.append(bundled_scales(granularity))
        except InputError:  # a trimmed installation: nothing to match against
            continue
    return found


def find_recipe(facts: GGUFFacts, scales: Path | None = None, candidates: Iterable[Path] = ()) -> Recipe | None:
    """The recipe of the scales folded into the GGUF: from an explicit `scales` file (which must be
    the one folded in), else the recipe the GGUF records itself, else the first scales file with
    its sha256 among candidates (paths recorded in reports) and the bundled scales.
    None: the GGUF carries no scales, or nothing describes them.
    """
    from seal_gguf.scales import read_scales

    sha = facts.scales_sha256
    if scales is not None:
        if sha is None:
            raise InputError(f"{facts.path}: carries no SEAL scales ({GGUFKeys.SCALES_SHA256} is absent); "
                             "--scales describes the scales folded into a GGUF by seal-gguf")
        read = read_scales(Path(scales))
        if read.sha256 != sha:
            raise InputError(f"{scales}: sha256 {str(read.sha256)[:12]}..., but {facts.path.name} was folded "
                             f"with scales {sha[:12]}...; give the scales file that was folded in")
        return Recipe(Path(scales), read.metadata)
    if sha is None:
        return None
    if facts.recorded_recipe:
        return Recipe(facts.path, facts.recorded_recipe)
    for path in [*(Path(c) for c in candidates), *bundled_candidates()]:
        if path.is_file() and sha256_file(path) == sha:
            return Recipe(path, read_scales(path).metadata)
    return None


def default_context(facts: GGUFFacts, recipe: Recipe | None) -> tuple[int, str]:
    """The context to run the GGUF with when the user gives none, and why: the model's context length
    (capped at MAX_DEFAULT_CTX), or the length the scales were learned at where that is longer (scales
    learned under a context extension). Not the learned length alone: SEAL is for long prompts, and
    scales learned at 1K tokens still help at 2K (README, Results)."""
    native = facts.context_length
    if native is None:
        ctx, reason = MAX_DEFAULT_CTX, "seal-gguf's default: the GGUF records no context length"
    elif native > MAX_DEFAULT_CTX:
        ctx, reason = MAX_DEFAULT_CTX, f"the model's context length {native}, capped at {MAX_DEFAULT_CTX}"
    else:
        ctx, reason = native, "the model's context length"
    if recipe is not None and recipe.length is not None and recipe.length > ctx:
        return recipe.length, f"the length the SEAL scales were learned at (recorded in {recipe.source.name})"
    return ctx, reason


