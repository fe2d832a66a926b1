"""The continuous batch on a thread of its own, between the server's event loop and the model.

Requests arrive from the event loop (`submit`), wait for a free row, join the batch between steps and
leave it when they finish or their client goes away (`cancel`). After each step, every row's new token
goes back to its request's asyncio queue, with one wake-up of the loop per step."""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections import deque
from dataclasses import dataclass, field

from darkhorse.infer.engine import ContinuousBatch, Engine, Row

TOKEN, END, FAILED = "token", "end", "failed"  # what a ticket's queue receives: (kind, value)


@dataclass(eq=False)
class Ticket:
    """One request's place: its row, and the queue its events arrive on, (TOKEN, id), then (END, finish
    reason) or (FAILED, message)."""

    row: Row
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)


class Scheduler:
    """Runs `ContinuousBatch` steps for as long as any request is waiting or decoding."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.batch = ContinuousBatch(engine, max_batch)
        self.inbox: queue.Queue = queue.Queue()  # ("add" | "cancel", ticket), or None to stop
        self.waiting: deque[Ticket] = deque()
        self.tickets: dict[int, Ticket] = {}  # id(row) -> ticket, for the rows in the batch
        self.thread = threading.Thread(target=self._run, name="darkhorse-decode", daemon=True)
        self.thread.start()

    def submit(self, row: Row) -> Ticket:
        """Queue `row` (from the event loop); its events arrive on the returned ticket."""
        ticket = Ticket(row, asyncio.get_running_loop())
        self.inbox.put(("add", ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Free the ticket's row, or drop it from the queue (a no-op once it finished)."""
        if ticket.row.finish_reason is None:
            self.inbox.put(("cancel", ticket))

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            idle = not self.batch.rows and not self.waiting
            messages = []
            try:
                messages.append(self.inbox.get(block=idle))  # when idle, sleep until a request comes
                while True:
                    messages.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for message in messages:
                if message is None:
                    return
                self._handle(*message)
            while self.waiting and not self.batch.full:
                ticket = self.waiting.popleft()
                self.tickets[id(ticket.row)] = ticket
                self.batch.add(ticket.row)
            if self.batch.rows:
                self._step()

    def _handle(self, action: str, ticket: Ticket) -> None:
        if action == "add":
            self.waiting.append(ticket)
        elif ticket in self.waiting:
            self.waiting.remove(ticket)
        elif self.tickets.pop(id(ticket.row), None) is not None:
            self.batch.remove(ticket.row)

    def _step(self) -> None:
        try:
            moved = self.batch.step()
        except Exception as exc:  # a bug must not take the server down: fail the rows, start a fresh batch
            failed = list(self.tickets.values())
            self.tickets.clear()
            self.batch = ContinuousBatch(self.batch.engine, self.batch.max_rows)
            self._deliver([(ticket, FAILED, f"decoding failed: {exc}") for ticket in failed])
            return
        events = []
        for row, token in moved:
            ticket = self.tickets[id(row)]
            if token is not None:
                events.append((ticket, TOKEN, token))
            if row.finish_reason is not None:
                events.append((ticket, END, row.finish_reason))
                del self.tickets[id(row)]
        self._deliver(events)

    @staticmethod
    def _deliver(events: list[tuple[Ticket, str, object]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for ticket, kind, value in events:
            by_loop.setdefault(ticket.loop, []).append((ticket, kind, value))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop has closed: nobody is listening
                loop.call_soon_threadsafe(_put_all, batch)


def _put_all(events: list[tuple[Ticket, str, object]]) -> None:
    for ticket, kind, value in events:
        ticket.events.put_nowait((kind, value))
