"""ShapesWorld: a tiny, fully trained SD1.5 + IP-Adapter look-alike on procedural shapes.

``data`` (images + captions), ``detector`` (what is in a generated image), ``models`` (the
pipeline and its Backbone), ``train`` (``bierasing world train``), ``evaluate`` (quality and
erasure metrics).
"""
