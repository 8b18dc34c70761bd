"""One reader class per backend behind :class:`~.base.SlideReader`; :mod:`wsi.slide.auto` chooses among them."""
