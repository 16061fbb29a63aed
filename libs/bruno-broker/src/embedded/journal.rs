//! The embedded broker's journal: an append-only file of "message `seq`
//! entered queue Q" and "message `seq` left" records, written by one
//! thread in groups, each group fsynced before the publishes it carries are
//! confirmed. Opening it replays the file (a torn last record from a crash
//! is cut off) and rewrites it with only the live messages; while running,
//! it is rewritten the same way whenever it grew past the compaction
//! threshold and holds mostly settled messages, so it stays bounded by the
//! messages actually waiting.
//!
//! Deliveries ("taken") and returns are journaled too (not fsynced on their
//! own), so a message that was being handled when the process died counts
//! as returned once more after the restart: a message that kills the
//! process every time reaches the delivery limit and is dead-lettered
//! instead of crashing every restart.
//!
//! Departures are not fsynced on their own: after a crash, a message whose
//! departure was not yet on disk comes back once more (at-least-once, as a
//! consumer dying before its ack on RabbitMQ). No confirmed message is lost.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};

use lapin::BasicProperties;
use tokio::sync::oneshot;

use super::Body;

const ENQUEUE: u8 = b'E';
const DELETE: u8 = b'D';
const TAKEN: u8 = b'T';
const RETURNED: u8 = b'R';
const FILE: &str = "journal";

/// A message the journal held when it was opened.
#[derive(Debug)]
pub struct Record {
    /// Its sequence number.
    pub seq: u64,
    /// Its queue.
    pub queue: String,
    /// Its properties.
    pub props: BasicProperties,
    /// Its body.
    pub body: Body,
    /// Times it came back unsettled, a crash while it was taken included.
    pub returns: u32,
}

enum Op {
    Enqueue {
        seq: u64,
        queue: String,
        props: Vec<u8>,
        body: Body,
        done: oneshot::Sender<Result<(), String>>,
    },
    Delete(u64),
    Taken(u64),
    Returned(u64, u32),
    Sync(oneshot::Sender<Result<(), String>>),
}

/// Handle to the journal's writer thread.
pub struct Journal {
    tx: mpsc::Sender<Op>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

struct Live {
    queue: String,
    props: Vec<u8>,
    body: Body,
    returns: u32,
    taken: bool,
}

fn encode_enqueue(
    out: &mut Vec<u8>,
    seq: u64,
    returns: u32,
    queue: &str,
    props: &[u8],
    body: &[u8],
) {
    out.push(ENQUEUE);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&returns.to_le_bytes());
    let q = queue.as_bytes();
    out.extend_from_slice(&(q.len() as u32).to_le_bytes());
    out.extend_from_slice(q);
    out.extend_from_slice(&(props.len() as u32).to_le_bytes());
    out.extend_from_slice(props);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

fn encode_delete(out: &mut Vec<u8>, seq: u64) {
    out.push(DELETE);
    out.extend_from_slice(&seq.to_le_bytes());
}

fn encode_taken(out: &mut Vec<u8>, seq: u64) {
    out.push(TAKEN);
    out.extend_from_slice(&seq.to_le_bytes());
}

fn encode_returned(out: &mut Vec<u8>, seq: u64, returns: u32) {
    out.push(RETURNED);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&returns.to_le_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.buf.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<usize> {
        usize::try_from(self.raw_u32()?).ok()
    }
    fn raw_u32(&mut self) -> Option<u32> {
        let b: [u8; 4] = self.take(4)?.try_into().ok()?;
        Some(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Option<u64> {
        let b: [u8; 8] = self.take(8)?.try_into().ok()?;
        Some(u64::from_le_bytes(b))
    }
}

enum Step {
    Enqueue(u64, Live),
    Delete(u64),
    Taken(u64),
    Returned(u64, u32),
}

/// Replay `buf`: the live messages by sequence number, and how many bytes
/// were whole records (the rest is a torn tail).
fn replay(buf: &[u8]) -> (BTreeMap<u64, Live>, usize) {
    let mut live = BTreeMap::new();
    let mut r = Reader { buf, at: 0 };
    let mut good = 0;
    loop {
        let record = (|| {
            let kind = *r.take(1)?.first()?;
            let seq = r.u64()?;
            match kind {
                ENQUEUE => {
                    let returns = r.raw_u32()?;
                    let n = r.u32()?;
                    let queue = String::from_utf8(r.take(n)?.to_vec()).ok()?;
                    let n = r.u32()?;
                    let props = r.take(n)?.to_vec();
                    let n = r.u32()?;
                    let body: Body = Arc::from(r.take(n)?);
                    Some(Step::Enqueue(
                        seq,
                        Live {
                            queue,
                            props,
                            body,
                            returns,
                            taken: false,
                        },
                    ))
                }
                DELETE => Some(Step::Delete(seq)),
                TAKEN => Some(Step::Taken(seq)),
                RETURNED => Some(Step::Returned(seq, r.raw_u32()?)),
                _ => None,
            }
        })();
        match record {
            Some(Step::Enqueue(seq, l)) => {
                live.insert(seq, l);
            }
            Some(Step::Delete(seq)) => {
                live.remove(&seq);
            }
            Some(Step::Taken(seq)) => {
                if let Some(l) = live.get_mut(&seq) {
                    l.taken = true;
                }
            }
            Some(Step::Returned(seq, returns)) => {
                if let Some(l) = live.get_mut(&seq) {
                    l.returns = returns;
                    l.taken = false;
                }
            }
            None => break,
        }
        good = r.at;
    }
    (live, good)
}

fn write_snapshot(dir: &Path, live: &BTreeMap<u64, Live>) -> io::Result<(File, u64)> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut out = Vec::new();
    for (seq, l) in live {
        encode_enqueue(&mut out, *seq, l.returns, &l.queue, &l.props, &l.body);
    }
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, dir.join(FILE))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    let f = OpenOptions::new().append(true).open(dir.join(FILE))?;
    Ok((f, out.len() as u64))
}

impl Journal {
    /// Open (or create) the journal in `dir`: the messages it holds, and a
    /// handle whose writer thread rewrites the file once it passed
    /// `compact_bytes` of mostly settled records.
    pub fn open(dir: &Path, compact_bytes: u64) -> io::Result<(Self, Vec<Record>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(FILE);
        let mut buf = Vec::new();
        match File::open(&path) {
            Ok(mut f) => {
                f.read_to_end(&mut buf)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let (mut live, good) = replay(&buf);
        // Taken and never settled: the process died while handling it.
        for l in live.values_mut() {
            if std::mem::take(&mut l.taken) {
                l.returns = l.returns.saturating_add(1);
            }
        }
        if good < buf.len() {
            tracing::warn!(
                bytes = buf.len() - good,
                "the broker journal ended in a torn record (a crash while writing); it was cut off"
            );
        }
        let mut records = Vec::with_capacity(live.len());
        for (seq, l) in &live {
            match serde_json::from_slice::<BasicProperties>(&l.props) {
                Ok(props) => records.push(Record {
                    seq: *seq,
                    queue: l.queue.clone(),
                    props,
                    body: l.body.clone(),
                    returns: l.returns,
                }),
                Err(e) => tracing::warn!(seq, error = %e, "unreadable journaled message skipped"),
            }
        }
        let (file, size) = write_snapshot(dir, &live)?;
        let (tx, rx) = mpsc::channel();
        let dir = dir.to_path_buf();
        std::thread::Builder::new()
            .name("bruno-journal".into())
            .spawn(move || writer(dir, file, size, live, rx, compact_bytes.max(1 << 16)))?;
        Ok((Self { tx }, records))
    }

    /// Append "message `seq` entered `queue`"; resolves once on disk.
    pub fn enqueue(
        &self,
        seq: u64,
        queue: &str,
        props: &BasicProperties,
        body: &Body,
    ) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        match serde_json::to_vec(props) {
            Ok(props) => {
                let _ = self.tx.send(Op::Enqueue {
                    seq,
                    queue: queue.to_owned(),
                    props,
                    body: body.clone(),
                    done,
                });
            }
            Err(e) => {
                let _ = done.send(Err(format!("encoding properties: {e}")));
            }
        }
        rx
    }

    /// Append "message `seq` left" (written with the next group).
    pub fn delete(&self, seq: u64) {
        let _ = self.tx.send(Op::Delete(seq));
    }

    /// Append "message `seq` was handed to a consumer".
    pub fn taken(&self, seq: u64) {
        let _ = self.tx.send(Op::Taken(seq));
    }

    /// Append "message `seq` came back unsettled, `returns` times so far".
    pub fn returned(&self, seq: u64, returns: u32) {
        let _ = self.tx.send(Op::Returned(seq, returns));
    }

    /// Resolves once everything sent before is on disk.
    pub fn sync(&self) -> oneshot::Receiver<Result<(), String>> {
        let (done, rx) = oneshot::channel();
        let _ = self.tx.send(Op::Sync(done));
        rx
    }
}

fn writer(
    dir: PathBuf,
    file: File,
    mut size: u64,
    mut live: BTreeMap<u64, Live>,
    rx: mpsc::Receiver<Op>,
    compact_bytes: u64,
) {
    // Each group is one write of `buf`: no buffering between groups.
    let mut file = file;
    let mut live_bytes: u64 = live
        .values()
        .map(|l| (25 + l.queue.len() + l.props.len() + l.body.len()) as u64)
        .sum();
    let mut buf = Vec::new();
    let mut waiting = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut op = Some(first);
        // Take what is queued already: one write and one fsync for all.
        while let Some(o) = op.take().or_else(|| rx.try_recv().ok()) {
            match o {
                Op::Enqueue {
                    seq,
                    queue,
                    props,
                    body,
                    done,
                } => {
                    encode_enqueue(&mut buf, seq, 0, &queue, &props, &body);
                    live_bytes += (25 + queue.len() + props.len() + body.len()) as u64;
                    live.insert(
                        seq,
                        Live {
                            queue,
                            props,
                            body,
                            returns: 0,
                            taken: false,
                        },
                    );
                    waiting.push(done);
                }
                Op::Taken(seq) => {
                    encode_taken(&mut buf, seq);
                    if let Some(l) = live.get_mut(&seq) {
                        l.taken = true;
                    }
                }
                Op::Returned(seq, returns) => {
                    encode_returned(&mut buf, seq, returns);
                    if let Some(l) = live.get_mut(&seq) {
                        l.returns = returns;
                        l.taken = false;
                    }
                }
                Op::Delete(seq) => {
                    encode_delete(&mut buf, seq);
                    if let Some(l) = live.remove(&seq) {
                        live_bytes = live_bytes.saturating_sub(
                            (25 + l.queue.len() + l.props.len() + l.body.len()) as u64,
                        );
                    }
                }
                Op::Sync(done) => waiting.push(done),
            }
            if buf.len() > 4 << 20 {
                break;
            }
        }
        let result = file.write_all(&buf).and_then(|()| {
            if waiting.is_empty() {
                Ok(())
            } else {
                file.sync_data()
            }
        });
        match &result {
            Ok(()) => size += buf.len() as u64,
            // A group written in part (disk full) must not stay in front
            // of later, confirmed groups: replay would stop at it.
            Err(_) => {
                if let Err(e) = file.set_len(size) {
                    tracing::error!(error = %e, "cannot cut a failed journal write back");
                }
            }
        }
        buf.clear();
        let outcome = result.map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, "broker journal write failed; publishes are refused");
        }
        for done in waiting.drain(..) {
            let _ = done.send(outcome.clone());
        }
        if size > compact_bytes && size > 4 * live_bytes {
            match write_snapshot(&dir, &live) {
                Ok((f, s)) => {
                    file = f;
                    size = s;
                }
                Err(e) => tracing::error!(error = %e, "broker journal compaction failed"),
            }
        }
    }
    let _ = file.sync_data();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(id: &str) -> BasicProperties {
        BasicProperties::default().with_message_id(id.into())
    }

    #[tokio::test]
    async fn confirmed_messages_survive_a_reopen_and_settled_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, restored) = Journal::open(dir.path(), 1 << 20).unwrap();
            assert!(restored.is_empty());
            let a = j.enqueue(1, "q", &props("a"), &Arc::from(&b"one"[..]));
            let b = j.enqueue(2, "r", &props("b"), &Arc::from(&b"two"[..]));
            a.await.unwrap().unwrap();
            b.await.unwrap().unwrap();
            j.delete(1);
            j.sync().await.unwrap().unwrap();
        }
        let (_j, restored) = Journal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(restored.len(), 1);
        assert_eq!(restored[0].seq, 2);
        assert_eq!(restored[0].queue, "r");
        assert_eq!(&*restored[0].body, b"two");
        assert_eq!(
            restored[0].props.message_id().as_ref().unwrap().as_str(),
            "b"
        );
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_off_and_the_rest_kept() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (j, _) = Journal::open(dir.path(), 1 << 20).unwrap();
            j.enqueue(7, "q", &props("x"), &Arc::from(&b"seven"[..]))
                .await
                .unwrap()
                .unwrap();
        }
        let path = dir.path().join(FILE);
        let mut torn = Vec::new();
        encode_enqueue(&mut torn, 8, 0, "q", b"{}", b"eight");
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&torn[..torn.len() - 3]).unwrap();
        drop(f);
        let (_j, restored) = Journal::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(restored.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![7]);
    }

    #[tokio::test]
    async fn the_file_stays_bounded_by_what_is_live() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path(), 1 << 16).unwrap();
        let body: Body = Arc::from(vec![7u8; 1000]);
        for seq in 0..2_000 {
            j.enqueue(seq, "q", &props("m"), &body)
                .await
                .unwrap()
                .unwrap();
            j.delete(seq);
        }
        j.sync().await.unwrap().unwrap();
        let len = std::fs::metadata(dir.path().join(FILE)).unwrap().len();
        // 2,000 messages of 1 kB passed through; at most the threshold stays.
        assert!(len < (1 << 16) + 8 * 1024, "journal is {len} bytes");
        drop(j);
        let (_j, restored) = Journal::open(dir.path(), 1 << 16).unwrap();
        assert!(restored.is_empty());
    }
}
