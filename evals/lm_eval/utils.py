"""lm-eval hooks for the deltaserve tasks: the zoo's own exact match, so scores equal ``deltaserve eval``'s."""

import json

from deltaserve_zoo.tasks import exact_match


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}


def process_real_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The real suite's skills: the skill's own normalised exact match (the accuracy matrix's scorer)."""
    from deltaserve_zoo.real.skills import get_skill

    return {"exact_match": float(get_skill(doc["skill"]).correct(results[0], real_answer(doc)))}


def real_answer(doc: dict) -> str:
    """The real suite's answer (stored JSON-encoded, so the dataset loader keeps it a string)."""
    return json.loads(doc["answer"])
