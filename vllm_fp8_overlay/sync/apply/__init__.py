"""The vLLM worker's side of an update: validate (:mod:`.validate`), receive
and collect a step (:mod:`.steps`), load it (:mod:`.load`), report what it
cost (:mod:`.report`). :mod:`..worker_extension` is the RPC surface over it."""
