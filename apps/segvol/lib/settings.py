"""The app's ``--conf`` options, parsed once and validated with clear messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from monailabel.config import settings

from segvol.model import CONFIGS
from segvol.postgres import shown
from segvol.vocabulary import Resolved, default_vocabulary

DEFAULT_AUTO_LABELS = (
    "liver",
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "stomach",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "esophagus",
)

# what /info offers OHIF's and Slicer's panels: common CT structures, by their vocabulary names; the
# Auto-Segmentation set among them, since OHIF's Auto-Segmentation asks only for the labels /info lists
DEFAULT_CATEGORIES = (
    *DEFAULT_AUTO_LABELS,
    "right lung",
    "left lung",
    "heart",
    "trachea",
    "urinary bladder",
    "colon",
    "duodenum",
    "small bowel",
    "right adrenal gland",
    "left adrenal gland",
)

HELP = {
    "weights": "a BAAI/SegVol snapshot folder or a .bin/.safetensors/.pth file; 'hub' (default): the "
    "snapshot in <app>/model/BAAI-SegVol, downloaded from Hugging Face on first start; "
    "'seeded': untrained random weights for demos and tests (every result says so)",
    "model_config": "segvol-official (default) or segvol-tiny (small test config, only with weights=seeded)",
    "device": "auto (CUDA where present), cpu or cuda[:N]",
    "zoom_in": "true (default): zoom-out-zoom-in; false: the zoom-out pass only (faster, coarser)",
    "precision": "fp32 (default, faithful); bf16 or fp16: faster, approximate (effect measured in docs/performance.md)",
    "overlap": "zoom-in window overlap: 0.5 (default, faithful); 0.25 or 0: fewer windows, approximate "
    "(docs/performance.md)",
    "categories": "comma-separated SegVol categories the clients' panels offer (in /info; Slicer makes a segment "
    "of each); every category stays available by name or index",
    "auto_labels": "comma-separated categories for OHIF's Auto-Segmentation (which asks for every label)",
    "auto_max_labels": "a label_prompt with more indices than this and no clicks counts as Auto-Segmentation (10)",
    "cache_mb": "memory for encodings of recently used images, per server (2048 MB, LRU)",
    "window_batch": "zoom-in windows encoded per encoder pass (4; lower it on a small GPU)",
    "decode_batch": "prompts or windows decoded per decoder pass (0, default: 8 on a GPU, 1 on a CPU)",
    "versions_dir": "where fine-tuned decoder versions live (default <app>/model/versions)",
    "train_steps": "decoder optimiser steps per fine-tune round (200)",
    "train_windows": "zoom-in windows per label a round trains on, those holding most of the label (4; 0: all)",
    "embedding_cache_mb": "disk for image encodings kept across rounds in <versions_dir>/.embeddings (4096; 0: off)",
    "train_lr": "learning rate of the decoder fine-tune (1e-4)",
    "train_batch": "samples (a view and a simulated prompt) per optimiser step of a round, a multiple of "
    "train_processes (default: train_processes, so 1)",
    "train_processes": "processes a round runs in, under torchrun (1): each encodes its share of the images "
    "and computes its share of every batch (one per GPU where there are GPUs; gloo on a CPU)",
    "train_after_labels": "start a round once this many new final labels are saved (0: off)",
    "train_every_minutes": "start a round on this schedule when there are new final labels (0: off)",
    "promote_min_gain": "held-out Dice must rise by more than this for a version to be served (0.0)",
    "promote_replay_margin": "other categories may move at most this far from the previous version (0.1)",
    "archive_refresh_seconds": "DICOMweb: how often the archive's series and SEGs are listed again (60)",
    "background_scoring": "score the unlabelled images for Next image's uncertainty strategy in the background, "
    "one image at a time between prompts, again after each promotion (true); false: Next image picks among "
    "the scores already stored (by another process or preannotate), else at random",
    "lease_minutes": "an image handed to one annotator is not handed to another for this long (30)",
    "max_upload_mb": "the largest label or image a client may upload, in MB (1024); "
    "sizes are checked from the file's header before anything is inflated",
    "datastore_changes": "without authentication, allow adding and deleting images, deleting labels and "
    "rewriting label info over REST (false; with authentication the admin role may)",
    "reviewers": "without authentication: comma-separated annotator names who may review (approve, return, "
    "correct, adjudicate) and see the team figures; names, not proofs (with authentication the token's "
    "reviewer or admin role decides and this is ignored)",
    "self_review": "a reviewer may review their own labels (false)",
    "train_on": "which final labels a round learns from: approved (default when there are reviewers: with "
    "authentication on or --conf reviewers) or final (every final label; a double-read image once adjudicated)",
    "double_read_fraction": "the share of images read by two annotators, blind, then adjudicated by a reviewer "
    "(0.0; which images is stable: a hash of the image id)",
    "team_db": "the team's shared state (leases, served results, saved labels, reviews): an SQLite file "
    "(default: .segvol/team.sqlite beside the datastore), or postgresql://user[:password]@host:port/db "
    "for a team across several hosts (model versions and the round lock then live there too)",
}


class ConfError(ValueError):
    """A --conf value that cannot be used."""


def _bool(conf: dict, key: str, default: bool) -> bool:
    v = str(conf.get(key, default)).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ConfError(f"--conf {key} {conf[key]!r}: expected true or false")


def _choice(conf: dict, key: str, options: tuple[str, ...]) -> str:
    value = str(conf.get(key, options[0]))
    if value not in options:
        raise ConfError(f"--conf {key} {value!r}: expected one of {', '.join(options)}")
    return value


def _team_db(conf: dict) -> str | None:
    """``--conf team_db``: a postgresql:// URL (checked here, so a typo stops the start) or a file."""
    value = str(conf.get("team_db") or "").strip()
    if not value:
        return None
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("postgresql", "postgres") or not parts.hostname or not parts.path.strip("/"):
            raise ConfError(
                f"--conf team_db {shown(value)!r}: expected postgresql://user[:password]@host[:port]/database "
                "or an SQLite file"
            )
        return value
    return str(Path(value))


@dataclass(frozen=True)
class AppSettings:
    weights: str = "hub"
    model_config: str = "segvol-official"
    device: str = "auto"
    zoom_in: bool = True
    precision: str = "fp32"
    overlap: float = 0.5
    categories: tuple[str, ...] = DEFAULT_CATEGORIES
    auto_labels: tuple[str, ...] = DEFAULT_AUTO_LABELS
    auto_max_labels: int = 10
    cache_mb: float = 2048.0
    window_batch: int = 4
    decode_batch: int = 0
    model_dir: Path = field(default=Path("model"))
    versions_dir: Path = field(default=Path("model/versions"))
    train_steps: int = 200
    train_windows: int = 4
    embedding_cache_mb: float = 4096.0
    train_lr: float = 1e-4
    train_batch: int = 1
    train_processes: int = 1
    train_after_labels: int = 0
    train_every_minutes: float = 0.0
    promote_min_gain: float = 0.0
    promote_replay_margin: float = 0.1
    lease_minutes: float = 30.0
    archive_refresh_seconds: float = 60.0
    max_upload_mb: float = 1024.0
    datastore_changes: bool = False
    background_scoring: bool = True
    team_db: str | None = None
    reviewers: tuple[str, ...] = ()
    self_review: bool = False
    train_on: str = "final"
    double_read_fraction: float = 0.0

    @classmethod
    def from_conf(cls, conf: dict, model_dir: Path) -> AppSettings:
        """The options of ``--conf`` (strings), checked: a bad value is a ConfError naming it."""
        unknown = sorted(k for k in conf if k in ("weights", "model_config") and not conf[k])
        if unknown:
            raise ConfError(f"--conf {unknown[0]} needs a value")
        numbers = _numbers(cls, conf)
        auto = conf.get("auto_labels")
        labels = tuple(s.strip() for s in auto.split(",") if s.strip()) if auto else DEFAULT_AUTO_LABELS
        model_config = conf.get("model_config", "segvol-official")
        reviewers = _reviewers(conf)
        if model_config not in CONFIGS:
            raise ConfError(f"--conf model_config {model_config!r}: expected one of {', '.join(CONFIGS)}")
        return cls(
            weights=conf.get("weights", "hub"),
            model_config=model_config,
            device=conf.get("device", "auto"),
            zoom_in=_bool(conf, "zoom_in", True),
            datastore_changes=_bool(conf, "datastore_changes", False),
            background_scoring=_bool(conf, "background_scoring", True),
            precision=_choice(conf, "precision", ("fp32", "bf16", "fp16")),
            categories=_categories(conf),
            auto_labels=labels,
            model_dir=model_dir,
            versions_dir=Path(conf.get("versions_dir") or model_dir / "versions"),
            team_db=_team_db(conf),
            reviewers=reviewers,
            self_review=_bool(conf, "self_review", False),
            train_on=_train_on(conf, reviewers),
            **numbers,
        )

    @property
    def seeded(self) -> bool:
        return self.weights == "seeded"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)


def _hint(resolved: Resolved) -> str:
    close = f" (closest: {', '.join(resolved.suggestions)})" if resolved.suggestions else ""
    return f"{resolved.typed.strip()!r}{close}"


def _categories(conf: dict) -> tuple[str, ...]:
    """``--conf categories`` as vocabulary names (a synonym becomes its trained name), each once. A
    name outside the vocabulary is refused: it has no index for /info to list, nor was SegVol trained on it."""
    text = conf.get("categories")
    if not text:
        return DEFAULT_CATEGORIES
    vocabulary = default_vocabulary()
    found = [vocabulary.resolve(s) for s in text.split(",") if s.strip()]
    unknown = [r for r in found if r.category is None]
    if unknown:
        hints = "; ".join(_hint(r) for r in unknown)
        raise ConfError(f"--conf categories: not SegVol categories: {hints}")
    if not found:
        raise ConfError(f"--conf categories {text!r}: expected at least one category name")
    return tuple(dict.fromkeys(r.category.name for r in found))


def _reviewers(conf: dict) -> tuple[str, ...]:
    """``--conf reviewers`` as names; one that no client id could be (lib/team/identity.py's rule:
    1 to 128 printable characters, no backslash or '=') is refused rather than never matching."""
    names = [s.strip() for s in str(conf.get("reviewers") or "").split(",") if s.strip()]
    bad = [n for n in names if len(n) > 128 or not n.isprintable() or "\\" in n or "=" in n]
    if bad:
        raise ConfError(f"--conf reviewers: {bad[0]!r} is not a usable annotator name")
    return tuple(dict.fromkeys(names))


def _train_on(conf: dict, reviewers: tuple[str, ...]) -> str:
    """approved or final; approved by default once someone can approve (reviewers named, or sign-in on)."""
    if "train_on" in conf:
        return _choice(conf, "train_on", ("approved", "final"))
    return "approved" if reviewers or settings.MONAI_LABEL_AUTH_ENABLE else "final"


NUMBERS = (
    "auto_max_labels",
    "overlap",
    "cache_mb",
    "window_batch",
    "decode_batch",
    "train_steps",
    "train_windows",
    "embedding_cache_mb",
    "train_lr",
    "train_batch",
    "train_processes",
    "train_after_labels",
    "train_every_minutes",
    "promote_min_gain",
    "promote_replay_margin",
    "lease_minutes",
    "archive_refresh_seconds",
    "max_upload_mb",
    "double_read_fraction",
)


def _numbers(cls: type, conf: dict) -> dict:
    """The numeric options, each of its default's type, and the rules between them."""
    numbers = {}
    for key in NUMBERS:
        default = cls.__dataclass_fields__[key].default
        kind = type(default)
        try:
            numbers[key] = kind(conf.get(key, default))
        except ValueError as e:
            raise ConfError(f"--conf {key} {conf[key]!r}: expected a {kind.__name__}") from e
    if not 0 <= numbers["overlap"] < 1:
        raise ConfError(f"--conf overlap {conf['overlap']!r}: expected 0 <= overlap < 1")
    if "train_batch" not in conf:
        numbers["train_batch"] = numbers["train_processes"]
    for key in ("train_batch", "train_processes"):
        if numbers[key] < 1:
            raise ConfError(f"--conf {key} {conf[key]!r}: expected a whole number of 1 or more")
    if numbers["train_batch"] % numbers["train_processes"]:
        raise ConfError(
            f"--conf train_batch {numbers['train_batch']}: the batch is split evenly over the "
            f"{numbers['train_processes']} processes (train_processes); use a multiple of it"
        )
    if not 0 <= numbers["double_read_fraction"] <= 1:
        raise ConfError(f"--conf double_read_fraction {conf['double_read_fraction']!r}: expected 0 to 1")
    for key in ("max_upload_mb", "lease_minutes"):
        if not numbers[key] > 0:
            raise ConfError(f"--conf {key} {conf[key]!r}: expected a positive number")
    return numbers
