"""Generate a synthetic event stream for the retailer rules in examples/rules/retail.yaml.

The stream covers 2025-01-01 to 2026-06-30 and mixes five kinds of customers:

- loyal: frequent buyers (many of them buy the "diapers-x" pack), who open emails, rate,
  review and refer friends; several reach the loyalty card (10 purchases or 500 spent
  within a year) and the fifth-pack discount;
- occasional: a purchase every few months and an email opened now and then;
- drifting: buy for a while, then go silent for months (capital drains), some come back;
- unhappy: repeated late deliveries and complaints, then they compare prices, visit the
  cancel page, often unsubscribe, and leave;
- prospects: browse and open emails but never buy (their relationship never opens).

Every event is one JSON object per line (id, customer, type, at, source and properties, see
docs/concepts.md, Events and time), sorted by `at`. The output depends only on the seed and the
number of customers, so re-running gives a byte-identical file:

    .venv/bin/python examples/events/generate.py                 # writes retail.jsonl
    .venv/bin/python examples/events/generate.py --seed 7 --customers 500 --out /tmp/e.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

DEFAULT_SEED = 20250101
DEFAULT_CUSTOMERS = 2000
DEFAULT_OUT = Path(__file__).resolve().parent / "retail.jsonl"

PERIOD_START = datetime(2025, 1, 1, tzinfo=UTC)
PERIOD_END = datetime(2026, 7, 1, tzinfo=UTC)  # exclusive
FIRST_NEWSLETTER = datetime(2025, 1, 2, 9, 0, tzinfo=UTC)
NEWSLETTER_EVERY = timedelta(days=14)

SEGMENT_WEIGHTS = {
    "loyal": 0.12,
    "occasional": 0.43,
    "drifting": 0.15,
    "unhappy": 0.09,
    "prospect": 0.21,
}

SKUS = [
    "wipes-sensitive",
    "formula-1",
    "baby-shampoo",
    "laundry-pods",
    "dish-tabs",
    "paper-towels",
    "coffee-beans",
    "pasta-box",
    "olive-oil",
    "cereal-family",
]
DIAPER_SKU = "diapers-x"

GOOD_REVIEWS = [
    "Arrived quickly and well packed, will order again.",
    "Great value for money, the diapers fit perfectly.",
    "Exactly as described, fast delivery.",
    "Good quality, my whole family uses it now.",
    "Very happy with the service and the product range.",
]
SHORT_REVIEWS = ["ok", "Good", "fine thanks", "Nice!"]
BAD_REVIEWS = [
    "Parcel came a week late and nobody answered my emails.",
    "Second late delivery this month, really disappointed.",
    "Box was damaged and support was slow to reply.",
]


class Stream:
    """Collects the events of all customers and hands out order and ticket numbers."""

    def __init__(self) -> None:
        self.events: list[tuple[datetime, str, int, dict]] = []
        self.orders = 0
        self.tickets = 0

    def add(self, customer: str, kind: str, at: datetime, source: str, **props: object) -> None:
        if at >= PERIOD_END:
            return
        at = at.replace(second=0, microsecond=0)
        # The insertion counter keeps ties between equal timestamps in generation order.
        self.events.append(
            (at, customer, len(self.events), {"type": kind, "source": source, **props})
        )

    def next_order(self) -> str:
        self.orders += 1
        return f"o-{self.orders:06d}"

    def next_ticket(self) -> str:
        self.tickets += 1
        return f"t-{self.tickets:05d}"

    def lines(self) -> list[str]:
        lines = []
        for number, (at, customer, _, body) in enumerate(sorted(self.events), start=1):
            event = {
                "id": f"e-{number:06d}",
                "customer": customer,
                "type": body["type"],
                "at": at.isoformat(),
                "source": body["source"],
            }
            event.update((k, v) for k, v in body.items() if k not in ("type", "source"))
            lines.append(json.dumps(event, separators=(", ", ": ")))
        return lines


class Customer:
    """One customer's behaviour: draws the timing and content of their events."""

    def __init__(self, rng: random.Random, stream: Stream, customer_id: str, segment: str):
        self.rng = rng
        self.stream = stream
        self.id = customer_id
        self.segment = segment
        self.opted_out: list[tuple[datetime, datetime]] = []
        self.diaper_buyer = False
        self.basket_mean = 50.0
        self.late_rate = 0.08
        self.newsletter_open_rate = 0.3
        self.review_rate = 0.05

    # --- small helpers -----------------------------------------------------------------

    def at_daytime(self, day: datetime) -> datetime:
        """The same day at a plausible shopping time (7:00 to 22:59), on a 5-minute grid."""
        midnight = day.replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight + timedelta(
            hours=self.rng.randint(7, 22), minutes=5 * self.rng.randint(0, 11)
        )

    def later(self, at: datetime, min_days: float, max_days: float) -> datetime:
        return self.at_daytime(at + timedelta(days=self.rng.uniform(min_days, max_days)))

    def emit(self, kind: str, at: datetime, source: str, **props: object) -> None:
        self.stream.add(self.id, kind, at, source, **props)

    # --- building blocks ---------------------------------------------------------------

    def browse(self, at: datetime, cancel: bool = False) -> None:
        page = "cancel" if cancel else self.rng.choice(["home", "product", "product"])
        self.emit("page_view", at, "web", page=page)

    def open_emails(self, start: datetime, end: datetime) -> None:
        """Opens of the fortnightly newsletter; an open is a contact and stops silence drain."""
        sent = FIRST_NEWSLETTER
        while sent < end:
            if (
                sent >= start
                and self.receives_newsletter(sent)
                and self.rng.random() < self.newsletter_open_rate
            ):
                self.emit(
                    "email_open",
                    sent + timedelta(minutes=self.rng.randint(10, 2880)),
                    "email",
                    campaign=f"nl-{sent:%Y%m%d}",
                )
            sent += NEWSLETTER_EVERY

    def delivery_delay(self, late_rate: float) -> int:
        if self.rng.random() >= late_rate:
            return self.rng.choice([0, 0, 0, 1, 1, 2])
        if self.rng.random() < 0.25:
            return self.rng.randint(8, 14)
        return self.rng.randint(3, 7)

    def complain(self, at: datetime, unresolved_rate: float = 0.15, slow_rate: float = 0.2) -> None:
        ticket = self.stream.next_ticket()
        self.emit("complaint", at, "helpdesk", ticket_id=ticket)
        draw = self.rng.random()
        if draw < unresolved_rate:
            return
        if draw < unresolved_rate + slow_rate:
            resolved = at + timedelta(days=self.rng.uniform(8, 20))
        else:
            resolved = at + timedelta(days=self.rng.uniform(0.2, 5))
        self.emit("ticket_resolved", resolved, "helpdesk", ticket_id=ticket)

    def order(
        self, at: datetime, late_rate: float | None = None, complaint_rate: float = 0.35
    ) -> int:
        """A purchase and what follows it; returns the delivery delay in days."""
        order_id = self.stream.next_order()
        sku = DIAPER_SKU if self.diaper_buyer and self.rng.random() < 0.7 else self.rng.choice(SKUS)
        amount = max(4.99, self.rng.lognormvariate(0, 0.45) * self.basket_mean)
        self.emit("purchase", at, "shop", order_id=order_id, amount=round(amount, 2), sku=sku)

        delay = self.delivery_delay(self.late_rate if late_rate is None else late_rate)
        delivered = at + timedelta(days=self.rng.uniform(1, 3) + delay)
        self.emit("delivery", delivered, "carrier", order_id=order_id, delay_days=delay)

        if delay > 2 and self.rng.random() < complaint_rate:
            self.complain(delivered + timedelta(hours=self.rng.uniform(1, 30)))
        if self.rng.random() < (0.12 if delay > 2 else 0.04):
            self.emit("return", self.later(delivered, 1, 6), "shop", order_id=order_id)

        if self.rng.random() < 0.08:
            rating = (
                self.rng.choice([1, 2, 2, 3]) if delay > 2 else self.rng.choice([3, 4, 4, 5, 5, 5])
            )
            self.emit(
                "rating", self.later(delivered, 0, 3), "shop", rating=rating, order_id=order_id
            )
        if self.rng.random() < self.review_rate:
            self.review(self.later(delivered, 1, 5), happy=delay <= 2)
        return delay

    def review(self, at: datetime, happy: bool = True) -> None:
        if not happy:
            text, rating = self.rng.choice(BAD_REVIEWS), self.rng.randint(1, 2)
        elif self.rng.random() < 0.2:
            text, rating = self.rng.choice(SHORT_REVIEWS), self.rng.randint(3, 5)
        else:
            text, rating = self.rng.choice(GOOD_REVIEWS), self.rng.randint(4, 5)
        self.emit("review", at, "shop", text=text, rating=rating)

    def contribution_burst(self, at: datetime) -> None:
        """A keen customer reviews and refers friends in a few days (tests contact pressure)."""
        self.review(at)
        self.emit("referral", self.later(at, 0.5, 2), "web", referred=f"{self.id}-friend")
        self.review(self.later(at, 2, 5))

    def receives_newsletter(self, sent: datetime) -> bool:
        return not any(start <= sent < end for start, end in self.opted_out)

    def maybe_unsubscribe(self, at: datetime, rate: float) -> None:
        if not self.receives_newsletter(at) or self.rng.random() >= rate:
            return
        self.emit("unsubscribe", at, "email")
        opted_in_again = PERIOD_END
        # Rarely, the customer changes their mind and opts back in.
        if self.rng.random() < 0.2:
            opted_in_again = self.later(at, 20, 150)
            self.emit("subscribe", opted_in_again, "email")
        self.opted_out.append((at, opted_in_again))

    def shop(
        self, start: datetime, end: datetime, mean_gap_days: float, burst_rate: float = 0.0
    ) -> datetime:
        """Orders from start to end about every mean_gap_days; returns the last purchase time."""
        at = start
        last = start
        while at < end:
            if self.rng.random() < 0.06:
                self.browse(at - timedelta(minutes=self.rng.randint(5, 90)))
            self.order(at)
            last = at
            if self.rng.random() < burst_rate:
                self.contribution_burst(self.later(at, 3, 10))
            if self.rng.random() < 0.003:
                self.billing_errors(at)
            # Household needs come back at a fairly steady pace, not as a memoryless process.
            gap = mean_gap_days * self.rng.uniform(0.6, 1.4)
            at = self.at_daytime(at + timedelta(days=gap))
        return last

    def billing_errors(self, at: datetime) -> None:
        first = self.later(at, 0, 2)
        self.emit("billing_error", first, "shop", invoice_id=f"inv-{self.id}-1")
        # Half of the customers hit by one are hit again within six months.
        if self.rng.random() < 0.5:
            self.emit(
                "billing_error", self.later(first, 20, 170), "shop", invoice_id=f"inv-{self.id}-2"
            )

    # --- segments ----------------------------------------------------------------------

    def simulate(self, joined: datetime) -> None:
        # Decided first, so that no newsletter is opened while the customer is opted out.
        if self.segment != "prospect":
            self.maybe_unsubscribe(self.later(joined, 10, 400), rate=0.04)
        getattr(self, f"simulate_{self.segment}")(joined)

    def simulate_loyal(self, joined: datetime) -> None:
        self.diaper_buyer = self.rng.random() < 0.5
        self.basket_mean = self.rng.uniform(35, 85)
        self.late_rate = 0.04
        self.newsletter_open_rate = self.rng.uniform(0.1, 0.4)
        self.review_rate = 0.1
        self.open_emails(joined, PERIOD_END)
        self.shop(joined, PERIOD_END, mean_gap_days=self.rng.uniform(28, 50), burst_rate=0.05)

    def simulate_occasional(self, joined: datetime) -> None:
        self.diaper_buyer = self.rng.random() < 0.1
        self.basket_mean = self.rng.uniform(25, 65)
        # Most occasional buyers read our emails; those who do not drift towards `watch`.
        self.newsletter_open_rate = self.rng.choice([0, 0.15, 0.2, 0.25, 0.3, 0.4])
        self.open_emails(joined, PERIOD_END)
        self.shop(joined, PERIOD_END, mean_gap_days=self.rng.uniform(45, 85))

    def simulate_drifting(self, joined: datetime) -> None:
        self.diaper_buyer = self.rng.random() < 0.2
        self.basket_mean = self.rng.uniform(25, 70)
        self.newsletter_open_rate = self.rng.uniform(0.1, 0.5)
        active_until = joined + timedelta(days=self.rng.uniform(30, 200))
        self.open_emails(joined, active_until)
        last = self.shop(joined, active_until, mean_gap_days=self.rng.uniform(20, 50))
        silence = timedelta(days=self.rng.uniform(50, 150))
        if self.rng.random() < 0.7:
            # Back after a long silence, either for a short while or as an occasional buyer.
            back = self.at_daytime(last + silence)
            stays_until = self.rng.choice([back + timedelta(days=90), PERIOD_END])
            self.newsletter_open_rate = 0.2
            self.open_emails(back, stays_until)
            self.shop(back, stays_until, mean_gap_days=self.rng.uniform(40, 70))

    def simulate_unhappy(self, joined: datetime) -> None:
        self.basket_mean = self.rng.uniform(30, 80)
        self.newsletter_open_rate = self.rng.uniform(0.1, 0.5)
        trouble_from = joined + timedelta(days=self.rng.uniform(0, 120))
        self.open_emails(joined, trouble_from)
        self.shop(joined, trouble_from, mean_gap_days=self.rng.uniform(30, 60))

        # A run of bad deliveries with complaints, some of them left unresolved.
        at = self.at_daytime(trouble_from)
        for _ in range(self.rng.randint(2, 4)):
            delay = self.order(at, late_rate=0.8, complaint_rate=0.7)
            if delay > 2 and self.rng.random() < 0.3:
                self.review(self.later(at, 4, 12), happy=False)
            at = self.later(at, 7, 25)

        # Pulled away: comparing prices, then the cancel page, then gone.
        for _ in range(self.rng.randint(1, 4)):
            self.emit(
                "price_compare",
                at,
                "web",
                competitor=self.rng.choice(["bigbox", "quickcart", "babyland"]),
            )
            at = self.later(at, 1, 6)
        if self.rng.random() < 0.7:
            self.browse(at, cancel=True)
        self.maybe_unsubscribe(self.later(at, 0, 3), rate=0.5)

    def simulate_prospect(self, joined: datetime) -> None:
        self.newsletter_open_rate = self.rng.uniform(0, 0.4)
        self.browse(joined)
        for _ in range(self.rng.randint(0, 3)):
            self.browse(self.later(joined, 1, 90))
        self.open_emails(joined, joined + timedelta(days=self.rng.uniform(30, 200)))


def generate(seed: int, customers: int) -> list[str]:
    rng = random.Random(seed)
    stream = Stream()
    segments = list(SEGMENT_WEIGHTS)
    weights = list(SEGMENT_WEIGHTS.values())
    span_days = (PERIOD_END - PERIOD_START).days - 30
    for number in range(1, customers + 1):
        segment = rng.choices(segments, weights)[0]
        customer = Customer(rng, stream, f"c-{number:04d}", segment)
        # Nobody joins in the last month, so that every customer has a little history.
        joined = PERIOD_START + timedelta(days=span_days * rng.random())
        customer.simulate(customer.at_daytime(joined))
    return stream.lines()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--customers", type=int, default=DEFAULT_CUSTOMERS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    lines = generate(args.seed, args.customers)
    text = "".join(line + "\n" for line in lines)
    args.out.write_text(text, encoding="utf-8", newline="\n")
    customer_count = len({json.loads(line)["customer"] for line in lines})
    print(
        f"{len(lines)} events, {customer_count} customers, "
        f"{len(text.encode('utf-8'))} bytes -> {args.out}"
    )


if __name__ == "__main__":
    main()
