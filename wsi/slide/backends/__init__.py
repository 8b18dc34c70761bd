"""One reader class per backend behind :class:`~.base.SlideReader`; :mod:`.auto` chooses among them."""
