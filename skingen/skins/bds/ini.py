"""The INI dialect of Baidu skin files (layouts ``*.ini``, ``*.cnd``, ``*.pop``, ``default.css``, ``*.til``).

``[SECTION]`` headers and ``KEY=value`` lines; blank lines and lines starting with ``;``, ``#`` or ``//`` are
comments. Section and key names are case-insensitive (kept upper case); a repeated key keeps its last value.
Values are kept whole (``NAMES`` and ``SHOW`` hold punctuation such as ``;``), numbers are read up to an inline
``;`` comment. Text is UTF-8 (a byte-order mark is skipped) or, failing that, GBK (GB18030). Every value keeps its
line, so a bad one is reported as ``file:line``.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field

from ...errors import SkingenError

_SECTION = re.compile(r"^\[([^\]]+)\]\s*$")
_COMMENTS = (";", "#", "//")


def decode_text(data: bytes, where: str) -> str:
    """Bytes of a skin text file as text: UTF-8 (with or without BOM), else GBK; anything else is an error."""
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    elif data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("gb18030")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise SkingenError(f"{where}:{line}: neither UTF-8 nor GBK text; save the file as UTF-8") from None


@dataclass
class Section:
    """One ``[NAME]`` section: values by upper-case key, each with its line number."""

    name: str
    file: str
    line: int
    values: dict[str, tuple[str, int]] = field(default_factory=dict)

    def __contains__(self, key: str) -> bool:
        return key in self.values

    def get(self, key: str, default: str | None = None) -> str | None:
        value = self.values.get(key)
        return value[0] if value is not None else default

    def where(self, key: str | None = None) -> str:
        """``file:line`` of ``key`` (of the section header when the key is absent)."""
        line = self.values[key][1] if key in self.values else self.line
        return f"{self.file}:{line}"

    def ints(self, key: str, count: int, what: str) -> tuple[int, ...] | None:
        """``count`` comma-separated whole numbers (None when the key is absent)."""
        raw = self.get(key)
        if raw is None:
            return None
        parts = [p.strip() for p in raw.split(";")[0].split(",")]
        try:
            numbers = tuple(int(p) for p in parts)
        except ValueError:
            numbers = ()
        if len(numbers) != count:
            raise SkingenError(
                f"{self.where(key)}: [{self.name}] {key} must be {what} ({count} whole numbers), got {raw!r}; fix the value"
            )
        return numbers

    def int(self, key: str, default: int | None = None) -> int | None:
        value = self.ints(key, 1, "a whole number")
        return default if value is None else value[0]

    def rect(self, key: str) -> tuple[int, int, int, int] | None:
        """``x,y,w,h`` with positive width and height."""
        rect = self.ints(key, 4, "x,y,w,h")
        if rect is not None and (rect[2] <= 0 or rect[3] <= 0):
            raise SkingenError(
                f"{self.where(key)}: [{self.name}] {key}={self.get(key)} has no area (width and height must be > 0)"
            )
        return rect


@dataclass
class IniFile:
    """A parsed file: its sections in order, by upper-case name."""

    path: str
    sections: dict[str, Section]

    def __contains__(self, name: str) -> bool:
        return name.upper() in self.sections

    def get(self, name: str) -> Section | None:
        return self.sections.get(name.upper())

    def numbered(self, prefix: str) -> list[tuple[int, Section]]:
        """``[PREFIXn]`` sections as (n, section), by n."""
        found = []
        for name, section in self.sections.items():
            if name.startswith(prefix) and name[len(prefix) :].isdigit():
                found.append((int(name[len(prefix) :]), section))
        return sorted(found, key=lambda item: item[0])


def parse_ini(data: bytes, path: str) -> IniFile:
    """Parse a skin INI file; a line that is neither a header, a ``KEY=value`` nor a comment is an error."""
    text = decode_text(data, path)
    sections: dict[str, Section] = {}
    current: Section | None = None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(_COMMENTS):
            continue
        header = _SECTION.match(line)
        if header:
            name = header.group(1).strip().upper()
            current = sections.get(name) or Section(name, path, number)
            sections[name] = current
            continue
        key, eq, value = line.partition("=")
        if not eq or not key.strip():
            raise SkingenError(f"{path}:{number}: expected [SECTION] or KEY=value, got {raw.strip()!r}; fix or remove the line")
        if current is None:
            raise SkingenError(f"{path}:{number}: {key.strip()}= comes before any [SECTION] header; put it in a section")
        current.values[key.strip().upper()] = (value.strip(), number)
    return IniFile(path, sections)


def format_ini(sections: list[tuple[str, dict[str, object]]], encoding: str = "utf-8-sig") -> bytes:
    """Sections as skin INI text (CRLF line ends, as the Windows tools write them), UTF-8 with a BOM by default."""
    lines = []
    for name, values in sections:
        lines.append(f"[{name}]")
        lines.extend(f"{key}={value}" for key, value in values.items())
        lines.append("")
    return "\r\n".join(lines).encode(encoding)
