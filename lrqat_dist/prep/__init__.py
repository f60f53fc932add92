"""Preparing demo assets once, into a cache: a real-English corpus and a float HF model from a GGUF.

Nothing in training, export or eval imports this package; the tools do
(``tools/prepare_text.py``, ``tools/prepare_model.py``, ``tools/quickstart.py``). See ``docs/prepare.md``.

Modules: :mod:`.cache` (cache root, atomic installs), :mod:`.prose` (corpus documents, prose
detection), :mod:`.extract` (HTML / reST / plain text / Bible -> paragraphs), :mod:`.fetch` (pip / apt
downloads into the cache), :mod:`.text_sources` (the registry of text sources), :mod:`.split`
(dedupe, held-out split, disjointness check), :mod:`.corpus` (building the corpus),
:mod:`.gguf_grid` (which GGUF grid weights sit on), :mod:`.gguf_model` (GGUF -> HF converter).
"""
