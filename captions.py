"""What a caption becomes when it is trained on: kohya sd-scripts' caption options.

    recipe = CaptionRecipe(instance_prompt="k4s4", keep_tokens=1, shuffle_caption=True)
    render(recipe, "k4s4, a cat, red, sitting", rng)   # -> "k4s4, sitting, a cat, red"

In this order, for each (epoch, sample) with an rng seeded by both (`rng_for`):
1. enable_wildcard: one line of a multi-line caption is drawn, and each {a|b|c} becomes one of
   its choices ({{ and }} are literal braces). Without it, lines were joined at the scan and
   braces are text.
2. instance_prompt (trimmed: "k4s4 " is "k4s4") goes in front unless the caption already has
   it as a tag; caption_prefix and caption_suffix are added around it with a space (kohya).
3. The caption splits at caption_separator into tags. The first keep_tokens tags (or, with
   keep_tokens_separator in the caption, everything before it; a second separator marks a kept
   tail) stay in place; shuffle_caption shuffles the others; caption_tag_dropout_rate drops
   each of the others with that probability. Tags are joined with ", ".
Step 3 runs only when a shuffle, a tag dropout or keep_tokens_separator asks for it.

The rendered caption depends only on (seed, epoch, sample), so it is reproducible and resumable,
and the run can list every caption it will train on before the text encoders run: each variant
is encoded once into the text cache (data.py). Whole-caption dropout (caption_dropout_rate) is
drawn per step in train.py and uses the cached empty caption.
"""
import hashlib
import random
import re
from dataclasses import dataclass

# config keys that make a section's caption recipe (they may also be set per dataset section)
CAPTION_KEYS = ("instance_prompt", "caption_prefix", "caption_suffix", "caption_separator", "keep_tokens",
                "keep_tokens_separator", "shuffle_caption", "caption_tag_dropout_rate", "enable_wildcard")


@dataclass(frozen=True)
class CaptionRecipe:
    instance_prompt: str = ""
    caption_prefix: str = ""
    caption_suffix: str = ""
    caption_separator: str = ","
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    shuffle_caption: bool = False
    caption_tag_dropout_rate: float = 0.0
    enable_wildcard: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> "CaptionRecipe":
        return cls(**{key: cfg[key] for key in CAPTION_KEYS})

    def changes_per_epoch(self, caption: str) -> bool:
        """Whether this caption can render differently from one epoch to the next."""
        random_tags = self.shuffle_caption or self.caption_tag_dropout_rate > 0
        wild = self.enable_wildcard and ("\n" in caption or WILDCARD.search(caption) is not None)
        return random_tags or wild


WILDCARD = re.compile(r"(?<!\{)\{([^{}]*\|[^{}]*)\}(?!\})")  # {a|b|c}, not {{escaped}}


def rng_for(seed: int, epoch: int, sample_key: str, what: str = "caption") -> random.Random:
    """A generator of its own for (seed, epoch, sample): the same draws in every run and on resume."""
    digest = hashlib.sha256(f"{seed}:{what}:{epoch}:{sample_key}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def render(recipe: CaptionRecipe, caption: str, rng: random.Random) -> str:
    """The caption as trained on in one (epoch, sample) (see the module docstring)."""
    if recipe.enable_wildcard:
        lines = [line.strip() for line in caption.split("\n") if line.strip()] or [""]
        caption = rng.choice(lines) if len(lines) > 1 else lines[0]
        caption = WILDCARD.sub(lambda m: rng.choice(m.group(1).split("|")), caption)
        caption = caption.replace("{{", "{").replace("}}", "}")
    caption = with_instance_prompt(caption, recipe.instance_prompt, recipe.caption_separator)
    if recipe.caption_prefix.strip():
        caption = f"{recipe.caption_prefix.strip()} {caption}".strip()
    if recipe.caption_suffix.strip():
        caption = f"{caption} {recipe.caption_suffix.strip()}".strip()
    if recipe.shuffle_caption or recipe.caption_tag_dropout_rate > 0 or recipe.keep_tokens_separator:
        caption = shuffle_tags(recipe, caption, rng)
    return caption


def with_instance_prompt(caption: str, instance_prompt: str, separator: str = ",") -> str:
    """The trigger word in front, once: "k4s4 " and "k4s4, a cat" give "k4s4, a cat"."""
    prompt = instance_prompt.strip().strip(separator).strip()
    if not prompt:
        return caption
    tags = [tag.strip() for tag in caption.split(separator)]
    if prompt in tags or caption == prompt or re.match(re.escape(prompt) + r"(\W|$)", caption):
        return caption
    return f"{prompt}{separator} {caption}" if caption.strip() else prompt


def split_tags(text: str, separator: str) -> list[str]:
    return [tag.strip() for tag in text.split(separator) if tag.strip()]


def shuffle_tags(recipe: CaptionRecipe, caption: str, rng: random.Random) -> str:
    """Step 3: kept tags in place, the others shuffled and dropped; joined with ", "."""
    sep, keep_sep = recipe.caption_separator, recipe.keep_tokens_separator
    head, tail = [], []
    if keep_sep and keep_sep in caption:
        fixed, flex = caption.split(keep_sep, 1)
        if keep_sep in flex:
            flex, fixed_tail = flex.split(keep_sep, 1)
            tail = split_tags(fixed_tail, sep)
        head, flex_tags = split_tags(fixed, sep), split_tags(flex, sep)
    else:
        tags = split_tags(caption, sep)
        head, flex_tags = tags[: recipe.keep_tokens], tags[recipe.keep_tokens :]
    if recipe.shuffle_caption:
        rng.shuffle(flex_tags)
    if recipe.caption_tag_dropout_rate > 0:
        flex_tags = [tag for tag in flex_tags if rng.random() >= recipe.caption_tag_dropout_rate]
    return ", ".join(head + flex_tags + tail)
