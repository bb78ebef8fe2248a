"""Parse and build the storage URIs used across kubetune (pure: no I/O, no environment).

Accepted forms (the same as the API's URI patterns in ``kubetune_operator.api.common``):

- ``hf://org/name[@revision]``: a Hugging Face Hub repository, optionally pinned.
- ``s3://bucket[/key]``: an object or prefix in S3 or an S3-compatible store.
- ``pvc://claim[/path]``: a path inside a PersistentVolumeClaim (mounted in the pod).
- ``file:///abs/path``: an absolute local path, percent-encoded as in RFC 8089 (``%20`` is a
  space), so ``Path.as_uri()`` output round-trips.
- a plain local path (absolute or relative), treated like ``file``.

S3 keys, claim paths and plain paths are taken literally (no percent-decoding). Trailing
slashes are dropped, so ``s3://models/team-a/`` and ``s3://models/team-a`` name the same
prefix. Credentials never belong in a URI: a URI that carries ``user@`` is refused without
echoing it.
"""

from __future__ import annotations

import posixpath
import re
import urllib.parse
from dataclasses import dataclass
from typing import Final, Literal

Scheme = Literal["hf", "s3", "pvc", "file"]

EXPECTED_FORMS: Final = (
    "hf://org/name[@revision], s3://bucket/prefix, pvc://claim/path, file:///abs/path"
    " or a local path"
)

_SCHEME_RE: Final = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_HF_PART_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_HF_REVISION_RE: Final = re.compile(r"^[A-Za-z0-9._/-]{1,128}$")
_BUCKET_RE: Final = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CLAIM_RE: Final = re.compile(r"^[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?$")
_CONTROL_RE: Final = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ParsedURI:
    """A parsed storage URI; only the fields of its scheme are set (the others are ``None``).

    Attributes:
        scheme: ``hf``, ``s3``, ``pvc`` or ``file`` (plain local paths are ``file``).
        repo: hf: ``org/name``.
        revision: hf: branch, tag or commit after ``@``; ``None`` when not pinned.
        bucket: s3: the bucket name.
        key: s3: the key or prefix without leading or trailing slash; ``""`` for the bucket root.
        claim: pvc: the PersistentVolumeClaim name.
        path: pvc: the path inside the claim without leading or trailing slash (``""`` for
            the claim root); file: the local path (absolute and percent-decoded for
            ``file://``, as given and possibly relative for plain paths), without trailing
            slash.
    """

    scheme: Scheme
    repo: str | None = None
    revision: str | None = None
    bucket: str | None = None
    key: str | None = None
    claim: str | None = None
    path: str | None = None

    def __str__(self) -> str:
        """The canonical URI (absolute local paths as percent-encoded ``file://``)."""
        if self.scheme == "hf":
            return f"hf://{self.repo}" + (f"@{self.revision}" if self.revision else "")
        if self.scheme == "s3":
            return f"s3://{self.bucket}" + (f"/{self.key}" if self.key else "")
        if self.scheme == "pvc":
            return f"pvc://{self.claim}" + (f"/{self.path}" if self.path else "")
        path = self.path or "."
        return _file_uri(path) if path.startswith("/") else path


def parse_uri(uri: str) -> ParsedURI:
    """Parse a storage URI or local path.

    Args:
        uri: one of the forms listed in the module docstring.

    Returns:
        The parsed URI.

    Raises:
        ValueError: the URI is empty, has an unsupported scheme, or a part does not match
            what its scheme expects; the message names the URI and the expected form (but
            never echoes a URI that appears to carry credentials).
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"empty storage URI; expected {EXPECTED_FORMS}")
    if _CONTROL_RE.search(uri):
        raise ValueError(
            f"storage URI {uri!r} contains control characters; expected {EXPECTED_FORMS}"
        )
    match = _SCHEME_RE.match(uri)
    if match is None:
        return ParsedURI(scheme="file", path=_strip_trailing_slashes(uri))
    scheme = match.group(1).lower()
    rest = uri[match.end() :]
    if scheme == "hf":
        return _parse_hf(uri, rest)
    if scheme == "s3":
        bucket, key = _split_authority(uri, rest, "s3", "bucket")
        if not _BUCKET_RE.match(bucket):
            raise ValueError(
                f"{uri!r}: bucket {bucket!r} is not a valid S3 bucket name; expected 3-63"
                " lowercase letters, digits, '.' and '-', starting and ending with a letter or"
                " digit"
            )
        return ParsedURI(scheme="s3", bucket=bucket, key=key)
    if scheme == "pvc":
        claim, path = _split_authority(uri, rest, "pvc", "claim")
        if not _CLAIM_RE.match(claim):
            raise ValueError(
                f"{uri!r}: claim {claim!r} is not a valid PersistentVolumeClaim name; expected"
                " a DNS label (lowercase letters, digits and '-')"
            )
        return ParsedURI(scheme="pvc", claim=claim, path=path)
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(
                f"{uri!r}: expected file:///absolute/path (three slashes; no host part)"
            )
        path = urllib.parse.unquote(rest)
        if _CONTROL_RE.search(path):
            raise ValueError(f"{uri!r}: the decoded path contains control characters")
        return ParsedURI(scheme="file", path=_strip_trailing_slashes(path))
    raise ValueError(f"unsupported URI scheme {scheme + '://'!r}; expected {EXPECTED_FORMS}")


def join(uri: str, *parts: str) -> str:
    """Append path segments to a URI or local path, keeping its form.

    ``join("s3://b/models", "run-1", "adapter/config.json")`` is
    ``"s3://b/models/run-1/adapter/config.json"``; a plain path stays a plain path.

    Args:
        uri: an s3, pvc or file URI, or a local path.
        *parts: relative segments; each may contain ``/`` but no empty, ``.`` or ``..``
            segment, and may not start with ``/``.

    Returns:
        The joined URI (or local path).

    Raises:
        ValueError: ``uri`` is invalid or an ``hf://`` URI (which names a repository, not a
            prefix), or a part is absolute or contains an empty, ``.`` or ``..`` segment.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        raise ValueError(f"{uri!r}: hf:// URIs name a repository and cannot be joined with paths")
    segments = _segments(uri, parts)
    if not segments:
        return str(parsed) if _SCHEME_RE.match(uri) else (parsed.path or uri)
    tail = "/".join(segments)
    if parsed.scheme in ("s3", "pvc"):
        return str(
            ParsedURI(scheme="s3", bucket=parsed.bucket, key=_concat(parsed.key, tail))
            if parsed.scheme == "s3"
            else ParsedURI(scheme="pvc", claim=parsed.claim, path=_concat(parsed.path, tail))
        )
    base = parsed.path or "."
    joined = base.rstrip("/") + "/" + tail if base != "/" else "/" + tail
    return _file_uri(joined) if _SCHEME_RE.match(uri) else joined


def parent(uri: str) -> str:
    """The URI one level up: ``parent("s3://b/a/c")`` is ``"s3://b/a"``.

    Raises:
        ValueError: ``uri`` is invalid, an ``hf://`` URI, or already a bucket, claim or file
            system root.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        raise ValueError(f"{uri!r}: hf:// URIs name a repository and have no parent")
    if parsed.scheme == "s3":
        if not parsed.key:
            raise ValueError(f"{uri!r} is a bucket root and has no parent")
        return str(ParsedURI(scheme="s3", bucket=parsed.bucket, key=posixpath.dirname(parsed.key)))
    if parsed.scheme == "pvc":
        if not parsed.path:
            raise ValueError(f"{uri!r} is a claim root and has no parent")
        return str(ParsedURI(scheme="pvc", claim=parsed.claim, path=posixpath.dirname(parsed.path)))
    path = parsed.path or "."
    if path == "/":
        raise ValueError(f"{uri!r} is the file system root and has no parent")
    up = posixpath.dirname(path) or "."
    return _file_uri(up) if _SCHEME_RE.match(uri) else up


def basename(uri: str) -> str:
    """The last segment of a URI's path: ``basename("s3://b/a/adapter")`` is ``"adapter"``.

    Returns ``""`` for a bucket or claim root.

    Raises:
        ValueError: ``uri`` is invalid or an ``hf://`` URI.
    """
    parsed = parse_uri(uri)
    if parsed.scheme == "hf":
        raise ValueError(f"{uri!r}: hf:// URIs name a repository, not a path")
    if parsed.scheme == "s3":
        return posixpath.basename(parsed.key or "")
    return posixpath.basename(parsed.path or "")


def _parse_hf(uri: str, rest: str) -> ParsedURI:
    expected = "hf://org/name[@revision]"
    repo, at, revision = rest.partition("@")
    org, slash, name = repo.partition("/")
    if not slash or not _HF_PART_RE.match(org) or not _HF_PART_RE.match(name):
        raise ValueError(
            f"{uri!r}: expected {expected} where org and name are 1-96 letters, digits,"
            " '.', '_' or '-'"
        )
    if at and not _HF_REVISION_RE.match(revision):
        raise ValueError(
            f"{uri!r}: revision {revision!r} is not valid; expected {expected} with a branch,"
            " tag or commit of letters, digits, '.', '_', '/' or '-'"
        )
    return ParsedURI(scheme="hf", repo=f"{org}/{name}", revision=revision if at else None)


def _split_authority(uri: str, rest: str, scheme: str, what: str) -> tuple[str, str]:
    expected = f"{scheme}://{what}/path"
    authority, _, path = rest.partition("/")
    if "@" in authority:
        # Never echo the URI: this looks like user:secret@host.
        raise ValueError(
            f"a {scheme}:// URI carries credentials ('user@'); credentials never belong in"
            " URIs (use the environment or the pod's identity)"
        )
    if not authority:
        raise ValueError(f"{uri!r}: missing the {what}; expected {expected}")
    path = path.strip("/")
    if path and any(segment in ("", ".", "..") for segment in path.split("/")):
        raise ValueError(
            f"{uri!r}: empty, '.' or '..' path segments are not allowed; expected {expected}"
        )
    return authority, path


def _segments(uri: str, parts: tuple[str, ...]) -> list[str]:
    segments: list[str] = []
    for part in parts:
        if part.startswith("/"):
            raise ValueError(f"cannot join {uri!r} with absolute path {part!r}")
        if _CONTROL_RE.search(part):
            raise ValueError(f"cannot join {uri!r} with {part!r}: control characters")
        for segment in part.rstrip("/").split("/"):
            if segment in ("", ".", ".."):
                raise ValueError(
                    f"cannot join {uri!r} with {part!r}: empty, '.' or '..' segments are not"
                    " allowed; expected relative names such as 'adapter/config.json'"
                )
            segments.append(segment)
    return segments


def _concat(prefix: str | None, tail: str) -> str:
    return f"{prefix}/{tail}" if prefix else tail


def _file_uri(path: str) -> str:
    return "file://" + urllib.parse.quote(path)


def _strip_trailing_slashes(path: str) -> str:
    stripped = path.rstrip("/")
    return stripped or "/"
