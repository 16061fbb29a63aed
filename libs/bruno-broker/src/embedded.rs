//! The embedded broker: the fleet's broker semantics inside one process,
//! for `bruno dev` on a machine without RabbitMQ (ADR 14).
//!
//! It keeps the same names and the same shape as the RabbitMQ topology:
//! the events exchange routes on headers with `x-match=all` to one queue per
//! part, then to the observed or unroutable queue when nothing matched; the
//! default exchange routes by queue name (retry tiers, dead letters,
//! replays). Messages are the codec's own AMQP properties and body, so the
//! consumer loop, the error headers and `bruno dlq` are the same code on
//! both brokers.
//!
//! Semantics kept: prefetch per consumer, redelivery (marked) of a message
//! whose handler never settled it, the delivery limit dead-lettering a
//! message that keeps coming back, retry tiers as timed wait queues that
//! never hold a worker, bounded unroutable and observed queues (drop-head,
//! TTL), single active consumer, request/reply inboxes that vanish with
//! their consumer. With a [`Journal`], every durable queue's messages are
//! appended (and fsynced in groups) before a publish is confirmed, so a
//! restart loses nothing that was confirmed.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot};

use crate::topology::Topology;

pub(crate) mod journal;
pub use journal::Journal;

/// A message body, shared between the queues it was routed to.
pub type Body = Arc<[u8]>;

#[derive(Debug, Clone)]
struct Msg {
    /// Journal sequence number (unique per message per queue).
    seq: u64,
    props: BasicProperties,
    body: Body,
    /// Times it went back to its queue unsettled.
    returns: u32,
    redelivered: bool,
    /// When it entered this queue.
    at: Instant,
}

#[derive(Debug, Clone)]
enum Kind {
    /// A part's work queue: dead-letters into `dlq` after `limit` returns;
    /// an interactive part's (ADR 17) also holds at most `max` requests
    /// and dead-letters those older than `ttl`, as its classic queue does
    /// on RabbitMQ.
    Work {
        dlq: String,
        limit: u32,
        requests: Option<(u32, Duration)>,
    },
    /// A retry tier: each message moves to `target` `delay` after it came.
    Retry { delay: Duration, target: String },
    /// A dead-letter queue: kept until a person drains it.
    Parking,
    /// Unroutable or observed: the oldest go past `max` or after `ttl`.
    Bounded { max: u32, ttl: Duration },
    /// A request/reply inbox: not journaled, deleted with its consumer.
    Inbox,
}

#[derive(Debug)]
struct Queue {
    kind: Kind,
    ready: VecDeque<Msg>,
    /// Consumers in arrival order; with `single_active` only the first takes.
    consumers: Vec<u64>,
    single_active: bool,
    notify: Arc<Notify>,
}

impl Queue {
    fn new(kind: Kind, single_active: bool) -> Self {
        Self {
            kind,
            ready: VecDeque::new(),
            consumers: Vec::new(),
            single_active,
            notify: Arc::new(Notify::new()),
        }
    }

    fn durable(&self) -> bool {
        !matches!(self.kind, Kind::Inbox)
    }

    fn may_take(&self, consumer: u64) -> bool {
        !self.single_active || self.consumers.first() == Some(&consumer)
    }
}

#[derive(Debug, Default)]
struct State {
    queues: HashMap<String, Queue>,
    /// Bindings of the events exchange: queue and the headers it needs.
    bindings: Vec<(String, BTreeMap<String, String>)>,
    next_seq: u64,
    next_consumer: u64,
}

/// Why the embedded broker refused a publish.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// No queue of that name (default exchange) or no such exchange.
    #[error("no route: {0}")]
    NoRoute(String),
    /// An interactive part's queue is full (`reject-publish`).
    #[error("queue {0} is full")]
    Full(String),
    /// The journal could not take the message.
    #[error("journal: {0}")]
    Journal(String),
}

/// A publish that is confirmed once every journal record it needs is on disk.
#[must_use = "a publish is confirmed only once this resolves"]
pub struct Confirm(Vec<oneshot::Receiver<Result<(), String>>>);

impl Confirm {
    /// Wait until the message is durable (at once without a journal).
    pub async fn wait(self) -> Result<(), Refused> {
        for rx in self.0 {
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(Refused::Journal(e)),
                Err(_) => return Err(Refused::Journal("journal writer stopped".into())),
            }
        }
        Ok(())
    }
}

/// The embedded broker; cheap to share behind an `Arc`.
pub struct Embedded {
    state: Mutex<State>,
    exchange: String,
    unroutable: String,
    observed_queue: String,
    observed_types: HashSet<String>,
    journal: Option<Journal>,
    retry_wake: Arc<Notify>,
}

impl std::fmt::Debug for Embedded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedded")
            .field("exchange", &self.exchange)
            .field("journal", &self.journal.is_some())
            .finish()
    }
}

fn header_matches(props: &BasicProperties, binding: &BTreeMap<String, String>) -> bool {
    let Some(headers) = props.headers() else {
        return binding.is_empty();
    };
    binding.iter().all(|(k, v)| {
        headers.inner().iter().any(|(hk, hv)| {
            hk.as_str() == k
                && match hv {
                    AMQPValue::LongString(s) => s.as_bytes() == v.as_bytes(),
                    AMQPValue::ShortString(s) => s.as_str() == v,
                    _ => false,
                }
        })
    })
}

fn event_type(props: &BasicProperties) -> Option<String> {
    crate::codec::header_str(props, "type")
}

impl Embedded {
    /// A broker with `topology` declared, restoring what `journal` holds.
    /// Must be called inside a Tokio runtime (it starts the retry timer).
    pub fn start(
        topology: &Topology,
        journal: Option<(Journal, Vec<journal::Record>)>,
    ) -> Arc<Self> {
        let names = &topology.names;
        let mut state = State::default();
        let (ucap, uttl) = topology.unroutable_bounds;
        let (ocap, ottl) = topology.observed_bounds;
        state.queues.insert(
            names.unroutable(),
            Queue::new(
                Kind::Bounded {
                    max: ucap,
                    ttl: uttl,
                },
                false,
            ),
        );
        state.queues.insert(
            names.observed(),
            Queue::new(
                Kind::Bounded {
                    max: ocap,
                    ttl: ottl,
                },
                false,
            ),
        );
        for part in &topology.parts {
            let queue = names.queue(&part.name);
            let dlq = names.dlq(&part.name);
            state
                .queues
                .insert(dlq.clone(), Queue::new(Kind::Parking, false));
            state.queues.insert(
                queue.clone(),
                Queue::new(
                    Kind::Work {
                        dlq,
                        limit: topology.delivery_limit,
                        requests: part.interactive.then_some(topology.request_bounds),
                    },
                    part.single_active_consumer,
                ),
            );
            for delay in &topology.retry_delays {
                state.queues.insert(
                    names.retry(&part.name, *delay),
                    Queue::new(
                        Kind::Retry {
                            delay: *delay,
                            target: queue.clone(),
                        },
                        false,
                    ),
                );
            }
            for binding in &part.bindings {
                state.bindings.push((queue.clone(), binding.clone()));
            }
        }
        let (journal, restored) = match journal {
            Some((j, records)) => (Some(j), records),
            None => (None, Vec::new()),
        };
        let mut orphans = 0usize;
        for record in restored {
            state.next_seq = state.next_seq.max(record.seq + 1);
            match state.queues.get_mut(&record.queue) {
                Some(q) => q.ready.push_back(Msg {
                    seq: record.seq,
                    props: record.props,
                    body: record.body,
                    returns: record.returns,
                    redelivered: record.returns > 0,
                    at: Instant::now(),
                }),
                None => {
                    orphans += 1;
                    if let Some(j) = &journal {
                        j.delete(record.seq);
                    }
                }
            }
        }
        if orphans > 0 {
            tracing::warn!(
                orphans,
                "journaled messages of queues this topology no longer has were dropped"
            );
        }
        let broker = Arc::new(Self {
            state: Mutex::new(state),
            exchange: names.exchange(),
            unroutable: names.unroutable(),
            observed_queue: names.observed(),
            observed_types: topology.observed.iter().cloned().collect(),
            journal,
            retry_wake: Arc::new(Notify::new()),
        });
        broker.dead_letter_over_limit();
        tokio::spawn(retry_timer(Arc::downgrade(&broker)));
        broker
    }

    /// Restored messages that came back more often than the delivery limit
    /// allows (the process died while handling them, again and again) go
    /// to their dead-letter queue instead of killing the next run too.
    fn dead_letter_over_limit(&self) {
        let mut state = self.lock();
        let mut over = Vec::new();
        for (name, q) in &mut state.queues {
            if let Kind::Work { dlq, limit, .. } = &q.kind {
                let (limit, dlq) = (*limit, dlq.clone());
                let (dead, keep): (VecDeque<Msg>, VecDeque<Msg>) = std::mem::take(&mut q.ready)
                    .into_iter()
                    .partition(|m| m.returns > limit);
                q.ready = keep;
                over.extend(dead.into_iter().map(|m| (name.clone(), dlq.clone(), m)));
            }
        }
        for (queue, dlq, m) in over {
            tracing::warn!(%queue, returns = m.returns, "a message that was being handled at every crash is dead-lettered");
            self.dead_letter(&mut state, &queue, &dlq, m, "delivery_limit");
        }
    }

    /// Move `m` from `queue` to `dlq` as RabbitMQ does at the delivery
    /// limit (`delivery_limit`) or at a message TTL (`expired`).
    fn dead_letter(&self, state: &mut State, queue: &str, dlq: &str, m: Msg, reason: &str) {
        let mut headers = m.props.headers().clone().unwrap_or_default();
        // As RabbitMQ: `x-first-death-*` once, the latest death first in
        // `x-death`.
        for (key, value) in [
            ("x-first-death-reason", reason),
            ("x-first-death-queue", queue),
        ] {
            if !headers.inner().contains_key(key) {
                headers.insert(key.into(), AMQPValue::LongString(LongString::from(value)));
            }
        }
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from(reason)),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString(LongString::from(queue)),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut deaths = vec![AMQPValue::FieldTable(death)];
        if let Some(AMQPValue::FieldArray(earlier)) = headers.inner().get("x-death") {
            deaths.extend(earlier.as_slice().iter().cloned());
        }
        headers.insert("x-death".into(), AMQPValue::FieldArray(deaths.into()));
        let props = m.props.clone().with_headers(headers);
        let mut confirms = Vec::new();
        // Durable before the original goes: the journal writes in order.
        match self.enqueue(state, dlq, props, m.body.clone(), &mut confirms) {
            Ok(()) => self.settled(&m),
            Err(e) => {
                // No DLQ (cannot happen with a declared topology): keep it.
                tracing::error!(%queue, error = %e, "no dead-letter queue; message kept");
                if let Some(q) = state.queues.get_mut(queue) {
                    q.ready.push_front(m);
                    q.notify.notify_waiters();
                }
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every
        // mutation is a single push, pop or move); keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Put a message in `queue` (under the lock), journaled if durable.
    fn enqueue(
        &self,
        state: &mut State,
        queue: &str,
        props: BasicProperties,
        body: Body,
        confirms: &mut Vec<oneshot::Receiver<Result<(), String>>>,
    ) -> Result<(), Refused> {
        let seq = state.next_seq;
        let Some(q) = state.queues.get_mut(queue) else {
            return Err(Refused::NoRoute(queue.to_owned()));
        };
        if q.durable()
            && let Some(j) = &self.journal
        {
            confirms.push(j.enqueue(seq, queue, &props, &body));
        }
        let now = Instant::now();
        if let Kind::Bounded { max, ttl } = q.kind {
            let mut dropped = Vec::new();
            while q
                .ready
                .front()
                .is_some_and(|m| now.duration_since(m.at) >= ttl)
                || (q.ready.len() as u64) >= u64::from(max.max(1))
            {
                if let Some(m) = q.ready.pop_front() {
                    dropped.push(m.seq);
                }
            }
            if let Some(j) = &self.journal {
                dropped.into_iter().for_each(|s| j.delete(s));
            }
        }
        // The timer learns when a request queue's new head expires.
        let retry = matches!(q.kind, Kind::Retry { .. })
            || (matches!(
                q.kind,
                Kind::Work {
                    requests: Some(_),
                    ..
                }
            ) && q.ready.is_empty());
        q.ready.push_back(Msg {
            seq,
            props,
            body,
            returns: 0,
            redelivered: false,
            at: now,
        });
        q.notify.notify_waiters();
        state.next_seq += 1;
        if retry {
            self.retry_wake.notify_one();
        }
        Ok(())
    }

    /// Route and store one message; the returned [`Confirm`] resolves once
    /// it is durable. `exchange` is the events exchange (headers routing,
    /// then observed or unroutable) or `""` (the queue named `routing_key`).
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        props: BasicProperties,
        body: Body,
    ) -> Result<Confirm, Refused> {
        let mut confirms = Vec::new();
        let mut state = self.lock();
        if exchange.is_empty() {
            self.enqueue(&mut state, routing_key, props, body, &mut confirms)?;
            return Ok(Confirm(confirms));
        }
        if exchange != self.exchange {
            return Err(Refused::NoRoute(format!("exchange {exchange}")));
        }
        let mut targets: Vec<String> = Vec::new();
        for (queue, binding) in &state.bindings {
            if !targets.contains(queue) && header_matches(&props, binding) {
                targets.push(queue.clone());
            }
        }
        if targets.is_empty() {
            let observed = event_type(&props).is_some_and(|t| self.observed_types.contains(&t));
            targets.push(if observed {
                self.observed_queue.clone()
            } else {
                self.unroutable.clone()
            });
        }
        // Refused whole, before any queue took it (RabbitMQ's reject-publish
        // nacks it too, though other queues may keep their copy).
        for queue in &targets {
            self.expire_requests(&mut state, queue);
            if let Some(q) = state.queues.get(queue)
                && let Kind::Work {
                    requests: Some((max, _)),
                    ..
                } = q.kind
                && q.ready.len() >= max as usize
            {
                return Err(Refused::Full(queue.clone()));
            }
        }
        for queue in targets {
            self.enqueue(
                &mut state,
                &queue,
                props.clone(),
                body.clone(),
                &mut confirms,
            )?;
        }
        Ok(Confirm(confirms))
    }

    /// Start consuming `queue` with at most `prefetch` unsettled messages.
    pub fn consume(self: &Arc<Self>, queue: &str, prefetch: u16) -> Result<Consumer, Refused> {
        let mut state = self.lock();
        let id = state.next_consumer;
        state.next_consumer += 1;
        let q = state
            .queues
            .get_mut(queue)
            .ok_or_else(|| Refused::NoRoute(queue.to_owned()))?;
        q.consumers.push(id);
        Ok(Consumer {
            broker: self.clone(),
            queue: queue.to_owned(),
            id,
            permits: Arc::new(Semaphore::new(usize::from(prefetch.max(1)))),
        })
    }

    /// Declare an inbox queue bound on each of `bindings` (auto-deleted by
    /// [`Embedded::delete_inbox`]).
    pub fn declare_inbox(&self, name: &str, bindings: Vec<BTreeMap<String, String>>) {
        let mut state = self.lock();
        state
            .queues
            .entry(name.to_owned())
            .or_insert_with(|| Queue::new(Kind::Inbox, false));
        for b in bindings {
            state.bindings.push((name.to_owned(), b));
        }
    }

    /// Delete an inbox and its bindings; its consumers see the end.
    pub fn delete_inbox(&self, name: &str) {
        let mut state = self.lock();
        state.bindings.retain(|(q, _)| q != name);
        if let Some(q) = state.queues.remove(name) {
            q.notify.notify_waiters();
        }
    }

    /// Messages ready in `queue` and its consumers, if it exists.
    pub fn depth(&self, queue: &str) -> Option<(u32, u32)> {
        let mut state = self.lock();
        self.expire_requests(&mut state, queue);
        let q = state.queues.get_mut(queue)?;
        self.expire(q);
        let n = |x: usize| u32::try_from(x).unwrap_or(u32::MAX);
        Some((n(q.ready.len()), n(q.consumers.len())))
    }

    fn expire(&self, q: &mut Queue) {
        if let Kind::Bounded { ttl, .. } = q.kind {
            let now = Instant::now();
            while q
                .ready
                .front()
                .is_some_and(|m| now.duration_since(m.at) >= ttl)
            {
                if let Some(m) = q.ready.pop_front()
                    && let Some(j) = &self.journal
                {
                    j.delete(m.seq);
                }
            }
        }
    }

    /// Up to `limit` messages of `queue`, oldest first, left in place.
    pub fn browse(&self, queue: &str, limit: usize) -> Option<Vec<(BasicProperties, Body)>> {
        let mut state = self.lock();
        self.expire_requests(&mut state, queue);
        let q = state.queues.get_mut(queue)?;
        self.expire(q);
        Some(
            q.ready
                .iter()
                .take(limit)
                .map(|m| (m.props.clone(), m.body.clone()))
                .collect(),
        )
    }

    /// Move every ready message of `from` that `pick` maps to new
    /// properties onto queue `to`; the rest stay. Returns (moved, kept).
    pub async fn move_where(
        &self,
        from: &str,
        to: &str,
        mut pick: impl FnMut(&BasicProperties, &[u8]) -> Option<BasicProperties>,
    ) -> Result<(u64, u64), Refused> {
        let mut confirms = Vec::new();
        let (mut moved, mut kept) = (0, 0);
        {
            let mut state = self.lock();
            if !state.queues.contains_key(to) {
                return Err(Refused::NoRoute(to.to_owned()));
            }
            let messages = match state.queues.get_mut(from) {
                Some(q) => std::mem::take(&mut q.ready),
                None => return Err(Refused::NoRoute(from.to_owned())),
            };
            let mut stay = VecDeque::new();
            for m in messages {
                match pick(&m.props, &m.body) {
                    Some(props) => {
                        self.enqueue(&mut state, to, props, m.body.clone(), &mut confirms)?;
                        if let Some(j) = &self.journal {
                            j.delete(m.seq);
                        }
                        moved += 1;
                    }
                    None => {
                        stay.push_back(m);
                        kept += 1;
                    }
                }
            }
            if let Some(q) = state.queues.get_mut(from) {
                q.ready = stay;
            }
        }
        Confirm(confirms).wait().await?;
        Ok((moved, kept))
    }

    /// Drop every ready message of `queue`; returns how many.
    pub fn purge(&self, queue: &str) -> Option<u32> {
        let mut state = self.lock();
        let q = state.queues.get_mut(queue)?;
        let n = q.ready.len();
        for m in q.ready.drain(..) {
            if let Some(j) = &self.journal {
                j.delete(m.seq);
            }
        }
        Some(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// A message its consumer did not settle goes back to the head of its
    /// queue, marked redelivered, or to the dead-letter queue once it came
    /// back more than the delivery limit allows (as RabbitMQ does).
    fn give_back(&self, queue: &str, mut m: Msg) {
        let mut state = self.lock();
        let Some(q) = state.queues.get_mut(queue) else {
            // Its queue is gone (an inbox): nothing to give back to.
            if let Some(j) = &self.journal {
                j.delete(m.seq);
            }
            return;
        };
        m.returns += 1;
        m.redelivered = true;
        if let Kind::Work { dlq, limit, .. } = &q.kind
            && m.returns > *limit
        {
            let dlq = dlq.clone();
            self.dead_letter(&mut state, queue, &dlq, m, "delivery_limit");
            return;
        }
        if q.durable()
            && let Some(j) = &self.journal
        {
            j.returned(m.seq, m.returns);
        }
        // Back at the head, it may be the next request to expire.
        let request = matches!(
            q.kind,
            Kind::Work {
                requests: Some(_),
                ..
            }
        );
        q.ready.push_front(m);
        q.notify.notify_waiters();
        if request {
            self.retry_wake.notify_one();
        }
    }

    fn settled(&self, m: &Msg) {
        if let Some(j) = &self.journal {
            j.delete(m.seq);
        }
    }

    fn leave(&self, queue: &str, consumer: u64) {
        let mut state = self.lock();
        if let Some(q) = state.queues.get_mut(queue) {
            q.consumers.retain(|c| *c != consumer);
            q.notify.notify_waiters();
        }
    }

    /// Dead-letter the requests at the head of `queue` that are past their
    /// TTL (an interactive part's queue; nothing for the others).
    fn expire_requests(&self, state: &mut State, queue: &str) {
        let Some(q) = state.queues.get_mut(queue) else {
            return;
        };
        let Kind::Work {
            dlq,
            requests: Some((_, ttl)),
            ..
        } = &q.kind
        else {
            return;
        };
        let expired = pop_due(&mut q.ready, *ttl, Instant::now(), &mut None);
        if expired.is_empty() {
            return;
        }
        let dlq = dlq.clone();
        for m in expired {
            self.dead_letter(state, queue, &dlq, m, "expired");
        }
    }

    /// Move retry messages whose delay passed and dead-letter requests past
    /// their TTL; returns when the next is due.
    fn release_due(&self) -> Option<Instant> {
        let mut state = self.lock();
        let now = Instant::now();
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        let mut expired = Vec::new();
        for (name, q) in &mut state.queues {
            match &q.kind {
                Kind::Work {
                    dlq,
                    requests: Some((_, ttl)),
                    ..
                } => {
                    for m in pop_due(&mut q.ready, *ttl, now, &mut next) {
                        expired.push((name.clone(), dlq.clone(), m));
                    }
                }
                Kind::Retry { delay, target } => {
                    for m in pop_due(&mut q.ready, *delay, now, &mut next) {
                        due.push((name.clone(), target.clone(), m));
                    }
                }
                _ => {}
            }
        }
        for (queue, dlq, m) in expired {
            self.dead_letter(&mut state, &queue, &dlq, m, "expired");
        }
        for (from, target, m) in due {
            let mut confirms = Vec::new();
            match self.enqueue(
                &mut state,
                &target,
                m.props.clone(),
                m.body.clone(),
                &mut confirms,
            ) {
                Ok(()) => self.settled(&m),
                Err(e) => {
                    tracing::error!(queue = %from, error = %e, "retry target missing; message kept");
                    if let Some(q) = state.queues.get_mut(&from) {
                        q.ready.push_front(m);
                    }
                }
            }
        }
        next
    }

    /// Queue names (tests and metrics).
    pub fn queue_names(&self) -> Vec<String> {
        self.lock().queues.keys().cloned().collect()
    }

    /// Write everything journaled so far to disk and wait for it.
    pub async fn sync(&self) -> Result<(), Refused> {
        match &self.journal {
            Some(j) => Confirm(vec![j.sync()]).wait().await,
            None => Ok(()),
        }
    }
}

/// Pop the messages at the head of `ready` that came `wait` or longer ago;
/// fold the time the next one is due into `next`.
fn pop_due(
    ready: &mut VecDeque<Msg>,
    wait: Duration,
    now: Instant,
    next: &mut Option<Instant>,
) -> Vec<Msg> {
    let mut out = Vec::new();
    while let Some(m) = ready.front() {
        let at = m.at + wait;
        if at > now {
            *next = Some(next.map_or(at, |n| n.min(at)));
            break;
        }
        out.extend(ready.pop_front());
    }
    out
}

async fn retry_timer(broker: Weak<Embedded>) {
    loop {
        let Some(b) = broker.upgrade() else { return };
        let notify = b.retry_wake.clone();
        let wake = notify.notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let next = b.release_due();
        // Hold no strong reference while waiting: the broker may go.
        drop(b);
        let sleep = match next {
            Some(at) => tokio::time::sleep_until(at.into()),
            // Nothing waiting: look again now and then (and when woken).
            None => tokio::time::sleep(Duration::from_secs(1)),
        };
        tokio::select! {
            _ = sleep => {}
            _ = wake => {}
        }
    }
}

/// A consumer of one queue; stops taking when dropped.
pub struct Consumer {
    broker: Arc<Embedded>,
    queue: String,
    id: u64,
    permits: Arc<Semaphore>,
}

impl Drop for Consumer {
    fn drop(&mut self) {
        self.broker.leave(&self.queue, self.id);
    }
}

impl Consumer {
    /// The next message, once this consumer has room for one (prefetch)
    /// and may take (single active consumer); `None` once the queue is
    /// deleted. Cancel-safe: a message is taken only when returned.
    pub async fn next(&self) -> Option<Delivery> {
        let permit = self.permits.clone().acquire_owned().await.ok()?;
        loop {
            let notify = self.broker.lock().queues.get(&self.queue)?.notify.clone();
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut state = self.broker.lock();
                self.broker.expire_requests(&mut state, &self.queue);
                let q = state.queues.get_mut(&self.queue)?;
                self.broker.expire(q);
                if q.may_take(self.id)
                    && let Some(m) = q.ready.pop_front()
                {
                    if q.durable()
                        && let Some(j) = &self.broker.journal
                    {
                        j.taken(m.seq);
                    }
                    return Some(Delivery {
                        properties: m.props.clone(),
                        redelivered: m.redelivered,
                        data: m.body.clone(),
                        handle: Unsettled {
                            broker: self.broker.clone(),
                            queue: self.queue.clone(),
                            msg: Some(m),
                            _permit: permit,
                        },
                    });
                }
            }
            notified.await;
        }
    }
}

/// A message taken from a queue.
pub struct Delivery {
    /// Its properties (headers).
    pub properties: BasicProperties,
    /// Its body.
    pub data: Body,
    /// It was taken before and never settled.
    pub redelivered: bool,
    /// Settle it with this.
    pub handle: Unsettled,
}

/// A taken message not yet settled: dropping it gives it back to its
/// queue, as a consumer's death does on RabbitMQ.
pub struct Unsettled {
    broker: Arc<Embedded>,
    queue: String,
    msg: Option<Msg>,
    _permit: OwnedSemaphorePermit,
}

impl Unsettled {
    /// Done with it: it leaves the broker.
    pub fn ack(mut self) {
        if let Some(m) = self.msg.take() {
            self.broker.settled(&m);
        }
    }

    /// Give it back to its queue now (marked redelivered).
    pub fn requeue(mut self) {
        if let Some(m) = self.msg.take() {
            self.broker.give_back(&self.queue, m);
        }
    }
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        if let Some(m) = self.msg.take() {
            self.broker.give_back(&self.queue, m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BrokerConfig, PartSpec};

    /// A message whose handler takes the whole process down every time
    /// (here: the broker is leaked with the message taken, as a crash
    /// leaves it) is dead-lettered once it passed the delivery limit,
    /// instead of crashing every restart.
    #[tokio::test]
    async fn a_message_taken_at_every_crash_is_dead_lettered_at_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let config = BrokerConfig {
            delivery_limit: 2,
            ..Default::default()
        };
        let topology = Topology::new(&config, vec![PartSpec::on_types("p", &["t"])]);
        let (queue, dlq) = (topology.names.queue("p"), topology.names.dlq("p"));
        let props = BasicProperties::default().with_headers({
            let mut h = FieldTable::default();
            h.insert("type".into(), AMQPValue::LongString("t".into()));
            h
        });
        let mut crashes = 0;
        loop {
            let journal = Journal::open(dir.path(), 1 << 20).unwrap();
            let broker = Embedded::start(&topology, Some(journal));
            if crashes == 0 {
                broker
                    .publish(
                        &topology.names.exchange(),
                        "",
                        props.clone(),
                        Arc::from(&b"x"[..]),
                    )
                    .unwrap()
                    .wait()
                    .await
                    .unwrap();
            }
            if broker.depth(&dlq).unwrap().0 == 1 {
                assert_eq!(broker.depth(&queue).unwrap().0, 0);
                let letters = broker.browse(&dlq, 10).unwrap();
                assert_eq!(
                    crate::codec::header_str(&letters[0].0, "x-first-death-reason").as_deref(),
                    Some("delivery_limit")
                );
                break;
            }
            assert!(crashes < 5, "never dead-lettered");
            let consumer = broker.consume(&queue, 1).unwrap();
            let d = consumer.next().await.unwrap();
            assert_eq!(d.redelivered, crashes > 0);
            broker.sync().await.unwrap();
            // The crash: nothing is settled or given back.
            std::mem::forget(d);
            std::mem::forget(consumer);
            std::mem::forget(broker);
            crashes += 1;
        }
        // Delivered three times (limit 2): the third return dead-letters it.
        assert_eq!(crashes, 3);
    }
}
