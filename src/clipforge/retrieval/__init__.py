"""Embed a collection, index it, search it, serve it: what clip-retrieval does, with clipforge's models.

``layout`` is the on-disk contract shared by every step (clip-retrieval's folder layout);
``embed`` writes it, ``index`` adds faiss indexes, ``search`` queries them, ``serve`` puts search
behind HTTP and a web page, ``filter`` scores image-caption pairs for data curation.
"""
