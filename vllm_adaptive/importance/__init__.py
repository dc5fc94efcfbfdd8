"""ADORE's importance machinery, shared by every side: the scorers behind one
``score()`` interface (``scorers/``), the GRU controller they may use
(``controller.py``), how scores combine (``rules.py``), and the controller's
offline training (``train.py``, ``vllm-adaptive train-controller``). What
runs in the engine around them is ``release/``."""
