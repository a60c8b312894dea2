"""Built-in offline few-shot classification tasks where a keyword lookup is not enough (issue 14).

Each task is generated procedurally from a seed; :func:`fewshot_splits` draws train / val / test from disjoint
seeds and removes from train every text that also appears in a held-out split. Records are
``{"text": ..., "label": ...}`` (single-label) or ``{"text": ..., "labels": [...]}`` (multi-label).

``sentiment_hard`` (labels ``positive``, ``negative``)
    Review sentences whose label needs the whole sentence: negated opposites ("was not dreadful at all"),
    concessions whose final clause decides ("Although the plot was dull, the acting was superb"), words of the
    other class as distractors in reported speech ("Critics called it a disaster, but I loved it"), and
    paraphrased plain statements. Every template is balanced: each label appears with words of both classes.
``science_topics`` (12 related fields)
    Paper-like titles in fine-grained, overlapping fields (two physics, two chemistry/biology pairs, earth
    sciences, two mathematics/computing fields); field terms are shared in pairs across related fields and
    every title carries a generic method phrase, so the label is the combination, not one rare word.
``sectors`` (multi-label, 8 sectors)
    Company descriptions that span one to three sectors ("builds payment software for hospitals": finance,
    technology, healthcare), for the multi-label path (multi-hot targets, per-class pos_weight,
    micro/macro-F1).
"""

from __future__ import annotations

import random
from typing import Any

SPLIT_SEED = {"train": 0, "val": 1, "test": 2, "unlabeled": 3}

# ------------------------------------------------------------------ sentiment_hard
_ITEMS = ["the film", "the meal", "the hotel", "the concert", "the novel", "the service", "the game",
          "the museum tour", "the new phone", "the workshop", "the play", "the flight"]
_POS = ["wonderful", "superb", "delightful", "excellent", "charming", "brilliant", "lovely", "impressive"]
_NEG = ["dreadful", "dull", "awful", "disappointing", "tedious", "terrible", "clumsy", "bland"]
_POS_VERB = ["loved it", "enjoyed every minute", "would gladly go again", "recommend it to everyone"]
_NEG_VERB = ["regretted it", "wanted my money back", "will never go again", "warn everyone against it"]


def _sentiment(rng: random.Random) -> dict[str, Any]:
    label = rng.choice(["positive", "negative"])
    good, bad = (_POS, _NEG) if label == "positive" else (_NEG, _POS)
    verb = _POS_VERB if label == "positive" else _NEG_VERB
    item, other = rng.sample(_ITEMS, 2)
    kind = rng.randrange(5)
    if kind == 0:  # negated opposite
        text = f"Honestly, {item} was not {rng.choice(bad)} at all; it was {rng.choice(good)}."
    elif kind == 1:  # concession: the final clause decides
        text = (f"Although {other} was {rng.choice(bad)}, {item} was {rng.choice(good)}, and that is what I "
                f"remember.")
    elif kind == 2:  # distractor in reported speech
        text = f"My friends called {item} {rng.choice(bad)}, but I {rng.choice(verb)}."
    elif kind == 3:  # negated verb phrase of the other class
        other_verb = _NEG_VERB if label == "positive" else _POS_VERB
        text = f"I expected to say I {rng.choice(other_verb)}, yet after {item} I {rng.choice(verb)}."
    else:  # plain paraphrase
        adverb = rng.choice(["truly", "quite", "really", "simply"])
        text = f"To sum up, {item} was {adverb} {rng.choice(good)} from start to finish."
    return {"text": text, "label": label}


# ------------------------------------------------------------------ science_topics
_FIELDS: dict[str, list[str]] = {
    "astrophysics": ["galaxy clusters", "stellar winds", "exoplanet atmospheres", "dark matter halos",
                     "gravitational lensing", "neutron stars"],
    "particle_physics": ["neutrino oscillations", "quark gluon plasma", "dark matter searches",
                         "the Higgs boson", "collider detectors", "gauge symmetries"],
    "condensed_matter": ["topological insulators", "superconducting films", "spin liquids",
                         "graphene sheets", "phonon transport", "gauge symmetries"],
    "organic_chemistry": ["asymmetric catalysis", "total synthesis", "cross coupling reactions",
                          "chiral ligands", "aromatic rings", "polymer chains"],
    "biochemistry": ["enzyme kinetics", "protein folding", "membrane transporters", "metabolic pathways",
                     "chiral ligands", "signalling cascades"],
    "genetics": ["gene expression", "genome wide association", "CRISPR screens", "epigenetic marks",
                 "population variants", "signalling cascades"],
    "neuroscience": ["cortical circuits", "synaptic plasticity", "memory consolidation", "spiking neurons",
                     "visual cortex", "epigenetic marks"],
    "ecology": ["pollinator networks", "invasive species", "forest succession", "coral reefs",
                "predator prey dynamics", "soil microbes"],
    "climatology": ["monsoon variability", "ocean heat uptake", "sea ice decline", "aerosol forcing",
                    "extreme rainfall", "coral reefs"],
    "geology": ["plate boundaries", "volcanic arcs", "sediment transport", "earthquake ruptures",
                "mantle plumes", "soil microbes"],
    "machine_learning": ["transformer models", "reinforcement learning", "graph neural networks",
                         "few-shot classification", "spiking neurons", "generative models"],
    "number_theory": ["prime gaps", "elliptic curves", "modular forms", "Diophantine equations",
                      "the Riemann zeta function", "graph colourings"],
}
_METHODS = ["a Bayesian analysis", "large-scale simulations", "a new measurement", "a unified framework",
            "high-resolution observations", "a theoretical model", "an open data set", "a scalable algorithm"]
_TITLES = ["{A} and {b}: {m}", "Constraining {a} with {m}", "On the role of {a} in {b}",
           "{A} revisited through {m}", "Linking {a} to {b} using {m}", "What {a} reveal about {b}"]


def _title(rng: random.Random) -> dict[str, Any]:
    label = rng.choice(sorted(_FIELDS))
    a, b = rng.sample(_FIELDS[label], 2)
    text = rng.choice(_TITLES).format(a=a, b=b, A=a[0].upper() + a[1:], m=rng.choice(_METHODS))
    return {"text": text, "label": label}


# ------------------------------------------------------------------ sectors (multi-label)
_SECTORS: dict[str, list[str]] = {
    "technology": ["builds cloud software", "develops mobile apps", "designs data platforms",
                   "writes AI tools"],
    "healthcare": ["for hospitals", "for clinics and pharmacies", "that supports patients",
                   "for medical labs"],
    "finance": ["handles payments", "offers small-business loans", "runs an insurance marketplace",
                "manages investment accounts"],
    "energy": ["operates solar farms", "installs heat pumps", "for wind turbine operators",
               "sells battery storage"],
    "retail": ["runs grocery stores", "sells clothing online", "for independent shops",
               "operates a marketplace"],
    "transportation": ["runs delivery vans", "for freight railways", "operates a ride-hailing fleet",
                       "for airports"],
    "manufacturing": ["produces steel parts", "assembles electronics", "makes packaging machines",
                      "for factory floors"],
    "media": ["publishes a news site", "produces podcasts", "streams films", "for advertising agencies"],
}
_NAMES = ["Northwind", "Bluepeak", "Crestline", "Hollowbrook", "Ironleaf", "Lumen", "Maple & Finch",
          "Orbitale", "Quayside", "Redmoor", "Silverton", "Tidewater", "Vantor", "Westgate",
          "Zephyr", "Amberly"]
_SUFFIX = ["Ltd", "Inc", "Group", "Labs", "Partners", "Co"]


def _company(rng: random.Random) -> dict[str, Any]:
    count = rng.choice([1, 2, 2, 3])
    sectors = rng.sample(sorted(_SECTORS), count)
    phrases = [rng.choice(_SECTORS[s]) for s in sectors]
    name = f"{rng.choice(_NAMES)} {rng.choice(_SUFFIX)}"
    if count == 1:
        body = phrases[0]
    elif count == 2:
        body = f"{phrases[0]} and {phrases[1]}"
    else:
        body = f"{phrases[0]}, {phrases[1]} and {phrases[2]}"
    text = f"{name} {body}." if not body.startswith("for") else f"{name} works {body}."
    return {"text": text, "labels": sorted(sectors)}


TASKS = {"sentiment_hard": (_sentiment, ["positive", "negative"], False),
         "science_topics": (_title, sorted(_FIELDS), False),
         "sectors": (_company, sorted(_SECTORS), True)}
INSTRUCTIONS = {
    "sentiment_hard": "Is the opinion in this review positive or negative? Answer with one word.\n"
                      "Review: {text}",
    "science_topics": "Which field is this paper title from? Options: {labels}. Answer with the field name.\n"
                      "Title: {text}",
    "sectors": "Which sectors does this company work in? Options: {labels}. Answer with the sectors, "
               "separated by commas.\nCompany: {text}",
}


def is_fewshot_task(name: str) -> bool:
    return name in TASKS


def task_labels(name: str) -> list[str]:
    return list(TASKS[name][1])


def task_is_multi_label(name: str) -> bool:
    return TASKS[name][2]


def generate(name: str, size: int, seed: int, exclude: set[str] | frozenset[str] = frozenset()
             ) -> list[dict[str, Any]]:
    """``size`` distinct records of task ``name`` from ``seed``, none with a text in ``exclude`` (rejection;
    fewer only if the generator runs out of new texts)."""
    make = TASKS[name][0]
    rng = random.Random(f"{name}:{seed}")
    seen: set[str] = set(exclude)
    records: list[dict[str, Any]] = []
    for _ in range(size * 50):
        if len(records) >= size:
            break
        record = make(rng)
        if record["text"] not in seen:
            seen.add(record["text"])
            records.append(record)
    return records


def fewshot_splits(name: str, sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Disjoint, exactly sized splits, each from its own seed, drawn in the order test, val, unlabeled,
    train, every one rejecting the texts of those drawn before it."""
    splits: dict[str, list[dict[str, Any]]] = {}
    taken: set[str] = set()
    for split in ("test", "val", "unlabeled", "train"):
        if sizes.get(split, 0) > 0:
            splits[split] = generate(name, sizes[split], seed * 1000 + SPLIT_SEED[split], taken)
            taken |= {r["text"] for r in splits[split]}
    return splits
