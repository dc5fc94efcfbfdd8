"""ADORE adaptive token release: every part, and where it runs.

A release layer holds each request to a KV budget: the scheduler releases
the lowest-scoring blocks back to vLLM's pool (after a copy to a host tier),
the workers score blocks and report the scores up, and released blocks the
current queries need are rebuilt. The paper's open choices and their
answers are in ``docs/ARCHITECTURE.md`` ("ADORE release").

================  ==========================  ==================================
side              module                      what
================  ==========================  ==================================
config (any)      ``kind.py``                 ``ReleaseKind`` (the ``release``
                                              layer kind: parsing, checks, engine
                                              set-up) and ``ReleaseParams``
any process       ``spec.py``                 ``ReleaseBudgetSpec``, the KV spec
both (wire)       ``messages.py``             what crosses each step: decisions
                                              down, scores up
scheduler         ``manager.py``              ``ReleaseManager``: release to the
                                              budget, rebuild, pins
scheduler         ``scores.py``               ``ScoreStore``: scores and bounds
                                              per (request, block)
scheduler         ``scheduler_side.py``       the connector's scheduler half
scheduler         ``stats.py``                counts and the stats file
both              ``host_tier.py``            ``HostSlots`` (scheduler: allocate
                                              / free) and ``HostPages`` (worker:
                                              copy-out / copy-in)
both (routing)    ``connector.py``            ``AdoreConnector``: the KV
                                              connector vLLM builds per role
worker            ``worker_side.py``          the connector's worker half: runs
                                              copies, binds tables to the step
worker            ``runner.py``               ``ReleaseTorch``: attention over
                                              the held blocks
worker            ``importance.py``           ``WorkerImportance``: scorer
                                              observations, rebuild bounds
================  ==========================  ==================================

Outside this package: the scorers and the GRU controller behind one
``score()`` interface and the reduction rules (``importance/``), the
controller's offline training (``importance/train.py``, ``vllm-adaptive
train-controller``). Start-up calls the kind's ``prepare_engine`` (the
connector, the prefill chunk, the controller's fit), as for any kind.

Nothing is imported here, so ``kinds/`` can list the kind without loading
the connector.
"""
