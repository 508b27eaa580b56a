"""Quality: compression, interpolation and merging tables (``tables``), the NPS probes (``probes``),
the zoo training-recipe sweep (``zoo_recipes``)."""
