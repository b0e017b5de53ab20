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
percent-encoded). A value with a line break never reaches the header lines.
Its ``Message-ID`` is made of the decision id, so a receiver can deduplicate.

Settings (``--set email.KEY=...`` or ``RETENTION_EMAIL_KEY``): ``host`` and ``from``
(required), ``port`` (25, or 587 with STARTTLS), ``starttls``, ``username``,
``password``, ``unsubscribe_url``, ``unsubscribe_mailto``, ``timeout`` (seconds, 10),
``templates`` (a folder; default: ``templates/`` beside the rules), ``cafile``.
"""

from __future__ import annotations

import smtplib
import ssl
import string
import urllib.parse
from email.message import EmailMessage
from email.utils import formatdate, getaddresses
from pathlib import Path
from typing import Any

from ..delivery import Delivery, DeliveryError, SettingError, Settings
from ..hookspecs import hookimpl


class EmailSink:
    def __init__(self, settings: Settings):
        self.host = settings.require("email", "host")
        self.sender = settings.require("email", "from")
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
        self.unsubscribe_mailto = settings.get("email", "unsubscribe_mailto")
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
        # the header lines and the body are filled apart, and a value may not add a line
        # to the headers: a customer id from an event must not write a Bcc: header
        head_template, _, body_template = text.partition("\n\n")
        head = _fill(head_template, values, f"template {path}")
        body = _fill(body_template, values, f"template {path}")
        if head.count("\n") != head_template.count("\n") or "\r" in head:
            raise DeliveryError(f"template {path}: a value has a line break and would change "
                                "the header lines", permanent=True)
        msg = EmailMessage()
        for line in head.split("\n"):
            key, sep, value = line.partition(":")
            if not sep or not key.strip() or key.strip().lower() in _RESERVED:
                raise DeliveryError(f"template {path}: the header lines before the blank line "
                                    f"must read 'Name: value' (and not set {key.strip()})",
                                    permanent=True)
            msg[key.strip()] = value.strip()
        if msg["Subject"] is None:
            raise DeliveryError(f"template {path}: no 'Subject:' line", permanent=True)
        msg["From"] = self.sender
        msg["To"] = recipient
        msg["Date"] = formatdate(localtime=False)
        domain = self.sender.rpartition("@")[2].strip("> ") or "retention.invalid"
        msg["Message-ID"] = f"<{d.id}@{domain}>"
        msg["X-Retention-Decision"] = d.id
        if unsubscribe is not None:
            targets = [f"<{unsubscribe}>"]
            if self.unsubscribe_mailto:
                targets.append(f"<mailto:{self.unsubscribe_mailto}>")
            msg["List-Unsubscribe"] = ", ".join(targets)
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
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
                self._connection().send_message(msg, to_addrs=[msg["To"]])
            except smtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                # the server closed a connection kept from an earlier message (an idle
                # timeout, a restart): one new connection before calling it a failure
                self.close()
                self._connection().send_message(msg, to_addrs=[msg["To"]])
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


#: headers the sink writes itself
_RESERVED = {"from", "to", "date", "message-id", "list-unsubscribe", "list-unsubscribe-post",
             "x-retention-decision"}


def _one_address(text: str) -> str:
    """The single plain address ``text`` must be: an identifier comes from events, and
    a list (``a@x, b@y``) or a display name must not add recipients."""
    pairs = getaddresses([text])
    if len(pairs) != 1 or pairs[0][0] or pairs[0][1] != text.strip() \
            or pairs[0][1].count("@") != 1:
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
