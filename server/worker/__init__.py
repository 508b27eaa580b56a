"""What runs inside vLLM's worker process: the dense path's extension (``extension``), the state it keeps
(``state``: the base's host copy and the merge of a recipe) and its host cache tier (``host_cache``)."""
