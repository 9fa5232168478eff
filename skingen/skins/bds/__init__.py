"""Baidu IME skin packages (``.bds``): reading, drawing their own keyboards, writing them back.

``ini`` reads the package's text files (UTF-8 with or without a byte-order mark, or GBK) keeping line numbers,
``resources`` the sprite sheets (``res/<sheet>.png`` + ``.til``) and styles (``res/default.css``), ``package``
a whole package (zipped or a folder) and its keyboards (``port/*.ini``, ``land/*.ini``, ``*.cnd``), ``render``
draws one keyboard with its exact key boxes and strings, ``writer`` writes an image back as a ``.bds`` and
``atlas`` lets the atlas layouts find a package's styles through ``--element_map baidu``. See docs/bds.md.
"""
