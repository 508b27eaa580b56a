"""lm-eval hooks for the deltaserve tasks: the zoo's own exact match, so scores equal ``deltaserve eval``'s."""

from zoo.tasks import exact_match


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"exact_match": float(exact_match(results[0], doc["answer"]))}
