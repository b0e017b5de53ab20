"""Built-in plugin: the ``email`` sink sends a decision as an email over SMTP.

The message comes from the action's template, ``<templates>/<template>.txt``: header
lines (``Subject:`` at least), a blank line, then the body. ``${name}`` placeholders
take the decision's parameters and ``customer``, ``decision``, ``action``, ``rule``,
``at``, ``email`` and ``unsubscribe_url``. The recipient is the customer's
``email:`` identifier (linked by an ``identify`` event), or the customer id itself
when it is an address. Consent and pressure were applied by the engine already:
the sink sends what it is given.

A marketing email carries ``List-Unsubscribe`` and ``List-Unsubscribe-Post:
List-Unsubscribe=One-Click`` as RFC 8058 defines them, from the
``unsubscribe_url`` setting (an https URL, with ``${customer}`` and ``${decision}``,
percent-encoded). Its ``Message-ID`` is made of the decision id, so a receiver can
deduplicate.

Values come from events, so no value may become a header line or a body: the
sink writes every header itself (its header objects fold as they were built, the
library never parses a value again) and a reader decodes each header to exactly the
text the template and its values make. Text that is not plain printable ASCII, or
that holds ``=?`` (which a reader would decode as an RFC 2047 encoded word), goes
out in encoded words of UTF-8; a value with a line break (any that
``str.splitlines`` knows: CR, LF, U+2028, U+0085...) is refused; an address is a
plain address or nothing.

Settings (``--set email.KEY=...`` or ``RETENTION_EMAIL_KEY``): ``host`` and ``from``
(required), ``port`` (25, or 587 with STARTTLS), ``starttls``, ``username``,
``password``, ``unsubscribe_url``, ``unsubscribe_mailto``, ``timeout`` (seconds, 10),
``templates`` (a folder; default: ``templates/`` beside the rules), ``cafile``.
"""

from __future__ import annotations

import re
import smtplib
import ssl
import string
import urllib.parse
from email import policy
from email.errors import HeaderParseError
from email.header import Header
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any

from ..delivery import Delivery, DeliveryError, SettingError, Settings
from ..hookspecs import hookimpl


class EmailSink:
    def __init__(self, settings: Settings):
        self.host = settings.require("email", "host")
        self.sender = settings.require("email", "from")
        try:
            [(self.sender_name, self.sender_address)] = _addresses(self.sender)
        except (DeliveryError, ValueError):  # (ValueError: not exactly one)
            raise SettingError(f"email: from must be one address, like 'Shop "
                               f"<care@shop.example>', got {self.sender!r}") from None
        self.starttls = settings.flag("email", "starttls")
        self.port = int(settings.number("email", "port", 587 if self.starttls else 25))
        self.username = settings.get("email", "username")
        self.password = settings.get("email", "password")
        if self.username and self.password is None:
            raise SettingError("email: a username needs RETENTION_EMAIL_PASSWORD "
                               "(or --set email.password=...)")
        if self.username and not self.starttls and not settings.flag("email", "plain_login"):
            raise SettingError("email: a login without STARTTLS would send the password in "
                               "clear: set email.starttls=true (or email.plain_login=true "
                               "for a server on a trusted network)")
        self.timeout = settings.number("email", "timeout", 10.0)
        self.unsubscribe_url = settings.get("email", "unsubscribe_url")
        if self.unsubscribe_url and not self.unsubscribe_url.startswith("https://"):
            raise SettingError("email: unsubscribe_url must be an https URL (RFC 8058)")
        if self.unsubscribe_url and not _URL.fullmatch(self.unsubscribe_url):
            raise SettingError("email: unsubscribe_url must be printable ASCII without "
                               "spaces (percent-encode the rest)")
        self.unsubscribe_mailto = settings.get("email", "unsubscribe_mailto")
        if self.unsubscribe_mailto is not None:
            try:
                _one_address(self.unsubscribe_mailto)
            except DeliveryError:
                raise SettingError("email: unsubscribe_mailto must be one plain address, "
                                   f"got {self.unsubscribe_mailto!r}") from None
        folder = settings.get("email", "templates")
        self.templates = Path(folder) if folder else None
        self.cafile = settings.get("email", "cafile")
        self._smtp: smtplib.SMTP | None = None

    # -- the message -------------------------------------------------------------------

    def message(self, delivery: Delivery) -> EmailMessage:
        """The email of one decision (raises DeliveryError, permanent, if it cannot be
        written: no address, no template, a placeholder without a value)."""
        d = delivery.decision
        recipient = delivery.identifier("email") or (d.customer if "@" in d.customer else None)
        if recipient is None:
            raise DeliveryError(f"no email address for customer {d.customer}: link one with "
                                'an identify event ("aliases": ["email:..."])', permanent=True)
        recipient = _one_address(recipient)
        params = dict(delivery.action.params) if delivery.action is not None else {}
        params.update(d.params)
        name = params.pop("template", None)
        folder = self.templates or delivery.templates
        if not name:
            raise DeliveryError(f"action {d.action} has no template (template: NAME)",
                                permanent=True)
        if folder is None:
            raise DeliveryError("no templates folder: set RETENTION_EMAIL_TEMPLATES",
                                permanent=True)
        path = folder / f"{name}.txt"
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise DeliveryError(f"template {path}: {getattr(exc, 'strerror', None) or exc}",
                                permanent=True) from None
        marketing = d.kind == "marketing"
        unsubscribe = None
        if marketing:
            if not self.unsubscribe_url:
                raise SettingError("email: marketing email needs RETENTION_EMAIL_UNSUBSCRIBE_URL"
                                   " (an https URL for one-click unsubscribe, RFC 8058)")
            # percent-encoded: an id with '#', '&', '?' or a space still names its customer
            unsubscribe = _fill(self.unsubscribe_url,
                                {"customer": urllib.parse.quote(d.customer, safe=""),
                                 "decision": urllib.parse.quote(d.id, safe="")},
                                "unsubscribe_url")
        values = {str(k): _text(v) for k, v in params.items()}
        values.update(customer=d.customer, decision=d.id, action=d.action, rule=d.rule,
                      at=d.at.isoformat(), email=recipient, unsubscribe_url=unsubscribe or "")
        # the template's header lines are read before any value fills them: a value
        # fills the value it stands in, never a name or a new line (a customer id from
        # an event must not write a Bcc: header)
        head_template, _, body_template = text.partition("\n\n")
        where = f"template {path}"
        lines = _header_lines(head_template, where)
        body = _fill(body_template, values, where)
        msg = EmailMessage(policy=_POLICY)
        for field, value_template in lines:
            value = _fill(value_template, values, where).strip()
            if _breaks_line(value):
                raise DeliveryError(f"{where}: a value has a line break and would change the "
                                    "header lines", permanent=True)
            if field.lower() in _ADDRESS_HEADERS:
                msg[field] = _Written(field, value, _address_list(field, value, where))
            else:
                msg[field] = _Written(field, value, encoded_text(field, value))
        msg["From"] = _Written("From", self.sender,
                               _mailbox(self.sender_name, self.sender_address))
        msg["To"] = _Written("To", recipient, _mailbox("", recipient))
        msg["Date"] = _structured("Date", formatdate(localtime=False))
        domain = self.sender_address.rpartition("@")[2] or "retention.invalid"
        msg["Message-ID"] = _structured("Message-ID", f"<{d.id}@{domain}>")
        msg["X-Retention-Decision"] = _structured("X-Retention-Decision", d.id)
        if unsubscribe is not None:
            targets = [f"<{unsubscribe}>"]
            if self.unsubscribe_mailto:
                targets.append(f"<mailto:{self.unsubscribe_mailto}>")
            msg["List-Unsubscribe"] = _structured("List-Unsubscribe", ", ".join(targets))
            msg["List-Unsubscribe-Post"] = _structured("List-Unsubscribe-Post",
                                                       "List-Unsubscribe=One-Click")
        msg.set_content(body)
        return msg

    # -- sending -----------------------------------------------------------------------

    def deliver(self, delivery: Delivery) -> None:
        try:
            msg = self.message(delivery)
        except ValueError as exc:  # a header value email refuses (a line break...)
            raise DeliveryError(f"cannot write the email: {exc}", permanent=True) from None
        try:
            reused = self._smtp is not None
            try:
                self._send(msg)
            except smtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # the server closed a connection kept from an earlier message (an idle
                # timeout, a restart): one new connection before calling it a failure
                self.close()
                self._send(msg)
        except ssl.SSLCertVerificationError as exc:
            self.close()
            raise SettingError(f"email: the certificate of {self.host} is not trusted "
                               f"({exc.verify_message}); set email.cafile to the CA that "
                               "signed it") from None
        except smtplib.SMTPAuthenticationError as exc:
            self.close()
            raise SettingError(f"email: the SMTP server refused the login: {_reply(exc)}"
                               ) from None
        except smtplib.SMTPNotSupportedError as exc:
            self.close()
            raise SettingError(f"email: {exc}") from None
        except smtplib.SMTPRecipientsRefused as exc:
            codes = [code for code, _ in exc.recipients.values()]
            if codes and all(c == _AUTH_REQUIRED for c in codes):
                self.close()
                raise _needs_tls_or_login(next(iter(exc.recipients.values()))) from None
            raise DeliveryError(f"recipient refused: {codes}",
                                permanent=all(c >= 500 for c in codes)) from None
        except smtplib.SMTPResponseException as exc:
            self.close()
            if exc.smtp_code == _AUTH_REQUIRED:  # every message would fail the same way
                raise _needs_tls_or_login((exc.smtp_code, exc.smtp_error)) from None
            raise DeliveryError(f"SMTP server: {_reply(exc)}",
                                permanent=exc.smtp_code >= 500) from None
        except (smtplib.SMTPException, OSError) as exc:
            self.close()
            raise DeliveryError(f"SMTP {self.host}:{self.port}: "
                                f"{getattr(exc, 'strerror', None) or exc or type(exc).__name__}"
                                ) from None

    def _send(self, msg: EmailMessage) -> None:
        # the envelope is given, never read back from the headers
        self._connection().send_message(msg, from_addr=self.sender_address,
                                        to_addrs=[str(msg["To"])])

    def _connection(self) -> smtplib.SMTP:
        if self._smtp is not None:
            return self._smtp
        smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
        try:
            if self.starttls:
                context = ssl.create_default_context(cafile=self.cafile)
                smtp.starttls(context=context)
            if self.username:
                smtp.login(self.username, self.password or "")
        except BaseException:
            smtp.close()
            raise
        self._smtp = smtp
        return smtp

    def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.quit()
            except (smtplib.SMTPException, OSError):
                smtp.close()


#: headers a template may not set: the sink writes them itself, and the message goes to
#: the customer alone (a Cc: or Bcc: line would name someone it is not sent to)
_RESERVED = {"from", "to", "cc", "bcc", "date", "message-id", "list-unsubscribe",
             "list-unsubscribe-post", "x-retention-decision"}
#: headers of a template that hold addresses, not text
_ADDRESS_HEADERS = {"reply-to", "sender"}
#: how the message is written: each header as the sink built it, never parsed again
_POLICY = policy.default.clone(refold_source="none")
#: the widest header line the sink writes where it can choose (RFC 5322: 78), and the
#: widest there may be (998)
WIDTH, LONGEST = 78, 998
#: an RFC 5322 field name, which a template writes as it is
_FIELD_NAME = re.compile(r"[!-9;-~]+")
#: text a header carries as it is: printable ASCII (no control character, no tab)
_PRINTABLE = re.compile(r"[ -~]*")
#: a plain address (dot-atoms, no quoting), a mailbox of an address list, and a display
#: name that needs no quoting or encoding
_ADDRESS = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9.-]+")
_MAILBOX = re.compile(r'(?P<name>[^<>",:;()\\]*?)\s*<(?P<angle>[^<>\s]+)>|(?P<bare>[^<>\s]+)')
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~ -]+")
_URL = re.compile(r"[!-~]+")
#: every line boundary of str.splitlines: a reader splitting on any of them must not
#: find a header line in a value
_LINE_BREAKS = re.compile("[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")


class _Written(str):
    """A header as the sink built it, in the header-object protocol of
    ``email.policy``: the string is the text a reader decodes, ``name`` the field
    name, and ``fold`` gives the lines written, as built (a value is never parsed,
    so an encoded word in it stays text)."""

    name: str
    wire: str

    def __new__(cls, name: str, text: str, wire: str) -> _Written:
        self = super().__new__(cls, text)
        self.name, self.wire = name, wire
        return self

    def fold(self, *, policy: Any) -> str:
        return f"{self.name}: {policy.linesep.join(self.wire.split(chr(10)))}{policy.linesep}"


def encoded_text(name: str, text: str) -> str:
    """The folded lines (joined by newlines, without ``name: ``) of a text header that
    a reader decodes to exactly ``text``: as it is when it is printable ASCII with no
    ``=?`` in it and folds at spaces within 78 columns; else as RFC 2047 encoded words
    of UTF-8, which carry any character and fold anywhere."""
    if _PRINTABLE.fullmatch(text) and "=?" not in text:
        lines = _fold(name, text)
        if all(len(line) <= WIDTH for line in lines):
            return "\n".join(lines)
    return Header(text, "utf-8", maxlinelen=WIDTH, header_name=name).encode(linesep="\n")


def _structured(name: str, text: str) -> _Written:
    """A header the sink composes from checked parts (an id, a URL): folded at spaces;
    a line past 998 characters cannot be sent."""
    lines = _fold(name, text)
    if not _PRINTABLE.fullmatch(text) or any(len(line) > LONGEST for line in lines):
        raise DeliveryError(f"the {name} header would not be plain ASCII within "
                            f"{LONGEST} characters a line", permanent=True)
    return _Written(name, text, "\n".join(lines))


def _fold(name: str, text: str) -> list[str]:
    """``text`` cut into lines at single spaces (a reader joins them back by removing
    the line breaks), each line as full as 78 columns allow with ``name: `` first."""
    lines = [""]
    room = WIDTH - len(name) - 2
    for piece in re.split(r"(?<=[^ ])(?= [^ ])", text):
        if lines[-1] and len(lines[-1]) + len(piece) > room:
            lines.append(piece)
            room = WIDTH
        else:
            lines[-1] += piece
    return lines


def _breaks_line(value: str) -> bool:
    return _LINE_BREAKS.search(value) is not None


def _header_lines(head: str, where: str) -> list[tuple[str, str]]:
    """The ``(name, value template)`` pairs of a template's header lines."""
    lines = []
    for line in head.split("\n"):
        key, sep, value = line.partition(":")
        name = key.strip()
        if not sep or not _FIELD_NAME.fullmatch(name) or "$" in name \
                or name.lower() in _RESERVED:
            raise DeliveryError(f"{where}: the header lines before the blank line must read "
                                f"'Name: value' (and not set {name})", permanent=True)
        lines.append((name, value))
    if not any(name.lower() == "subject" for name, _ in lines):
        raise DeliveryError(f"{where}: no 'Subject:' line", permanent=True)
    return lines


def _addresses(text: str) -> list[tuple[str, str]]:
    """The ``(display name, address)`` pairs of a list of plain mailboxes, ``addr`` or
    ``Name <addr>``, separated by commas: nothing a reader could take otherwise (a
    group, a quote, a comment, an encoded word in an address) and nothing dropped."""
    pairs = []
    for item in text.split(","):
        match = _MAILBOX.fullmatch(item.strip())
        if match is None:
            raise DeliveryError(f"{text!r} is not a list of plain email addresses",
                                permanent=True)
        name, addr = (match["name"] or "").strip(), match["angle"] or match["bare"]
        if not _plain_address(addr) or _breaks_line(name):
            raise DeliveryError(f"{text!r} is not a list of plain email addresses",
                                permanent=True)
        pairs.append((name, addr))
    return pairs


def _plain_address(addr: str) -> bool:
    """``local@domain`` in plain ASCII, no ``=?``, as the header registry reads it."""
    if not _ADDRESS.fullmatch(addr) or "=?" in addr:
        return False
    try:
        return Address(addr_spec=addr).addr_spec == addr
    except (ValueError, HeaderParseError):
        return False


def _mailbox(name: str, addr: str) -> str:
    """``name <addr>`` as written: the name as it is when it is plain words, else in
    encoded words (never in quotes, where some readers decode them all the same)."""
    if not name:
        return addr
    if not (_ATOMS.fullmatch(name) and "=?" not in name):
        words = Header(name, "utf-8", maxlinelen=WIDTH).encode(linesep="\n")
        name = " ".join(word.strip() for word in words.split("\n"))
    return f"{name} <{addr}>"


def _address_list(field: str, text: str, where: str) -> str:
    """The folded lines of an address header holding the mailboxes of ``text``."""
    try:
        pairs = _addresses(text)
    except DeliveryError:
        raise DeliveryError(f"{where}: {field}: {text!r} is not a list of plain email "
                            "addresses", permanent=True) from None
    return "\n".join(_fold(field, ", ".join(_mailbox(n, a) for n, a in pairs)))


def _one_address(text: str) -> str:
    """The single plain address ``text`` must be: an identifier comes from events, and
    a list (``a@x, b@y``), a display name or an encoded word must not add recipients
    or header lines."""
    try:
        pairs = _addresses(text)
    except DeliveryError:
        pairs = []
    if len(pairs) != 1 or pairs[0][0] or pairs[0][1] != text.strip():
        raise DeliveryError(f"{text!r} is not one email address", permanent=True)
    return pairs[0][1]


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _fill(text: str, values: dict[str, str], what: str) -> str:
    try:
        return string.Template(text).substitute(values)
    except KeyError as exc:
        raise DeliveryError(f"{what}: no value for ${{{exc.args[0]}}}", permanent=True
                            ) from None
    except ValueError as exc:
        raise DeliveryError(f"{what}: {exc}", permanent=True) from None


def _reply(exc: smtplib.SMTPResponseException) -> str:
    return _reply_text(exc.smtp_code, exc.smtp_error)


def _reply_text(code: int, text: bytes | str) -> str:
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    return f"{code} {text}"


#: the reply of a server that sends nothing before STARTTLS or a login (RFC 3207, 4954)
_AUTH_REQUIRED = 530


def _needs_tls_or_login(reply: tuple[int, bytes | str]) -> SettingError:
    """A configuration problem, not the decision's: the run stops, nothing is spent."""
    return SettingError(f"email: the SMTP server wants STARTTLS or a login first (set "
                        f"email.starttls, email.username and email.password): "
                        f"{_reply_text(*reply)}")


@hookimpl
def register_sinks(register: Any) -> None:
    register("email", EmailSink)
