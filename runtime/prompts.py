"""Domain-aware contrastive-state prompts (SPEC section 3) and their text embeddings: the sentences
of a class and how their embeddings become its t+/t- and T. Pure numpy, so that the export (with
PyTorch) and `anoclip classes add` (on the device, through the exported text tower) make the same."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np

from .classes import MVTEC_TEXTURES
from .scoring import l2_normalise

log = logging.getLogger(__name__)

NORMAL_STATES = (
    "normal {}", "flawless {}", "perfect {}", "unblemished {}",
    "{} without flaw", "{} without defect", "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}", "abnormal {}", "imperfect {}", "blemished {}",
    "{} with flaw", "{} with defect", "{} with damage",
)
BASE_TEMPLATES = (
    "a cropped photo of the {}", "a cropped photo of a {}", "a close-up photo of a {}",
    "a close-up photo of the {}", "a bright photo of a {}", "a bright photo of the {}",
    "a dark photo of the {}", "a dark photo of a {}", "a jpeg corrupted photo of a {}",
    "a jpeg corrupted photo of the {}", "a blurry photo of the {}", "a blurry photo of a {}",
    "a photo of a {}", "a photo of the {}", "a photo of a small {}", "a photo of the small {}",
    "a photo of a large {}", "a photo of the large {}", "a photo of the {} for visual inspection",
    "a photo of a {} for visual inspection", "a photo of the {} for anomaly detection",
    "a photo of a {} for anomaly detection",
)
DOMAINS = {
    "object": ("industrial photo", "industrial image", "manufacturing image"),
    "texture": ("industrial photo", "textural photo", "surface picture"),
}
CLASS_PHRASES = {"macaroni1": "macaroni", "macaroni2": "macaroni"}


def class_phrase(name: str) -> str:
    """The phrase a class name stands for in the prompts (names are used as given)."""
    return CLASS_PHRASES.get(name, name)


def default_domain(name: str) -> str:
    """texture for the MVTec AD textures, object for everything else."""
    return "texture" if name in MVTEC_TEXTURES else "object"


def domain_phrases(domain: str | Sequence[str]) -> tuple[str, ...]:
    """'object', 'texture', or the user's own phrases (a sequence, or a '|'-separated string)."""
    if isinstance(domain, str):
        if domain in DOMAINS:
            return DOMAINS[domain]
        phrases = tuple(p.strip() for p in domain.split("|") if p.strip())
    else:
        phrases = tuple(p.strip() for p in domain if p.strip())
    if not phrases:
        raise ValueError(f"domain {domain!r} names no phrase; use object, texture or 'phrase one|phrase two'")
    return phrases


def domain_template(template: str, phrase: str) -> str:
    """Replace the word 'photo' by ``phrase``; the article right before it becomes 'an' before a vowel."""
    words = template.split(" ")
    index = words.index("photo")
    words[index : index + 1] = phrase.split(" ")
    if index > 0 and words[index - 1] == "a" and phrase[:1].lower() in "aeiou":
        words[index - 1] = "an"
    return " ".join(words)


def domain_templates(phrases: Iterable[str], base_templates: Sequence[str] = BASE_TEMPLATES) -> list[str]:
    return [domain_template(t, p) for p in phrases for t in base_templates]


@dataclass(frozen=True)
class PromptTables:
    """The word lists sentences are made of: this release's, or those an export recorded in its
    folder's text recipe (``text_recipe.<sha>.json``), which a device encodes new classes with."""

    base_templates: tuple[str, ...] = BASE_TEMPLATES
    normal_states: tuple[str, ...] = NORMAL_STATES
    abnormal_states: tuple[str, ...] = ABNORMAL_STATES
    domains: tuple[tuple[str, tuple[str, ...]], ...] = tuple(DOMAINS.items())
    class_phrases: tuple[tuple[str, str], ...] = tuple(CLASS_PHRASES.items())

    @classmethod
    def from_recipe(cls, recipe: dict) -> "PromptTables":
        """The tables of a text recipe's JSON; a ValueError when one is missing or malformed."""
        def strings(key):
            value = recipe.get(key)
            if not (isinstance(value, list) and value and all(isinstance(v, str) and "{}" in v for v in value)):
                raise ValueError(f"the text recipe's {key} is not a list of templates with {{}}")
            return tuple(value)

        domains = recipe.get("domains")
        phrases = recipe.get("class_phrases", {})
        if not (isinstance(domains, dict) and all(isinstance(v, list) and v for v in domains.values())
                and isinstance(phrases, dict)):
            raise ValueError("the text recipe's domains or class_phrases are malformed")
        return cls(strings("base_templates"), strings("normal_states"), strings("abnormal_states"),
                   tuple((k, tuple(v)) for k, v in domains.items()), tuple(phrases.items()))


@dataclass(frozen=True)
class PromptRecipe:
    """Everything that determines a class's sentences."""

    name: str
    phrase: str
    domain: str
    domain_phrases: tuple[str, ...]
    defect_types: tuple[str, ...] = ()  # the kinds of defect a region is named after (none: regions are not typed)

    @classmethod
    def for_class(cls, name: str, domain: str | Sequence[str] | None = None, phrase: str | None = None,
                  tables: PromptTables = PromptTables(), defect_types: Sequence[str] = ()) -> "PromptRecipe":
        domain = default_domain(name) if domain is None else domain
        named = dict(tables.domains)
        if isinstance(domain, str) and domain in named:
            label, phrases = domain, named[domain]
        else:
            label, phrases = "custom", domain_phrases(domain)
        return cls(name, phrase or dict(tables.class_phrases).get(name, name), label, tuple(phrases),
                   parse_defect_types(defect_types))

    def sentences(self, tables: PromptTables = PromptTables()) -> tuple[list[str], list[str]]:
        """(normal, abnormal) sentences, template-major, no trailing period."""
        templates = domain_templates(self.domain_phrases, tables.base_templates)
        normal = [t.format(s.format(self.phrase)) for t in templates for s in tables.normal_states]
        abnormal = [t.format(s.format(self.phrase)) for t in templates for s in tables.abnormal_states]
        return normal, abnormal

    def type_sentences(self, tables: PromptTables = PromptTables()) -> list[list[str]]:
        """Per defect type, its sentences: ``template.format(f"{phrase} with {type}")`` for every
        template of the class's ensemble (the templates its t+/t- are made with)."""
        templates = domain_templates(self.domain_phrases, tables.base_templates)
        return [[t.format(f"{self.phrase} with {kind}") for t in templates] for kind in self.defect_types]

    def as_metadata(self, tables: PromptTables = PromptTables()) -> dict:
        types = {"defect_types": list(self.defect_types),
                 "defect_type_sentence": "template.format(f'{class_phrase} with {type}') over the templates, "
                                         "embeddings averaged, then unit norm"} if self.defect_types else {}
        return {**types, 
            "class_phrase": self.phrase,
            "domain": self.domain,
            "domain_phrases": list(self.domain_phrases),
            "templates": "BASE_TEMPLATES with 'photo' replaced by each domain phrase, phrase-major",
            "sentence": "template.format(state.format(class_phrase)), template-major, states in order",
            "normal_states": list(tables.normal_states),
            "abnormal_states": list(tables.abnormal_states),
            "base_templates": list(tables.base_templates),
        }


def class_embeddings(raw_normal: np.ndarray, raw_abnormal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw sentence embeddings -> (text_features [2,D] = t+, t-; prompt_features T [2N,D])."""
    text = np.stack([l2_normalise(raw_normal.mean(axis=0)), l2_normalise(raw_abnormal.mean(axis=0))])
    prompts = l2_normalise(np.concatenate([raw_normal, raw_abnormal]))
    return text.astype(np.float32), prompts.astype(np.float32)


def parse_defect_types(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """Defect type names from ``scratch,dent`` or a sequence: stripped, in order, each once; a
    ValueError for an empty name or one holding a comma."""
    if not value:
        return ()
    names = [v.strip() for v in (value.split(",") if isinstance(value, str) else value)]
    if any(not n for n in names):
        raise ValueError(f"defect types {value!r} hold an empty name; write them as scratch,dent,stain")
    if any("," in n for n in names):
        raise ValueError(f"defect type names {names!r} hold a comma")
    return tuple(dict.fromkeys(names))


def type_embeddings(raw: Sequence[np.ndarray]) -> np.ndarray:
    """Per defect type its raw sentence embeddings [T, D] -> unit rows [K, D] (mean over the
    templates, then L2-normalised, as t+/t- are made)."""
    return np.stack([l2_normalise(np.asarray(r, np.float64).mean(axis=0)) for r in raw]).astype(np.float32)


def encode_sentences(encode: Callable[[list[str]], np.ndarray], sentences: list[str], batch_size: int = 128,
                     progress=None) -> np.ndarray:
    """Encode sentences in batches with ``encode`` (list of str -> [n, D] raw embeddings)."""
    parts = []
    for start in range(0, len(sentences), batch_size):
        parts.append(encode(sentences[start : start + batch_size]))
        if progress is not None:
            progress.update(min(batch_size, len(sentences) - start))
    return np.concatenate(parts).astype(np.float64)
