//! The cluster's relay-account list in JetStream (`[cluster] shared_accounts`).
//!
//! One list for every relay: the account file's TOML text is the latest message of the
//! subject `<prefix>_accounts.list` in the stream `<stream>_ACCOUNTS` (the last 16 versions
//! are kept, so a bad edit can be looked back at). `whispeer-relay account add|remove`
//! with the relay's configuration edits it there — read the latest version, change it,
//! write it back only if it is still the latest (`Nats-Expected-Last-Subject-Sequence`),
//! else start over — and every relay follows the subject and installs each new version at
//! once ([`crate::accounts::Accounts::install`]), closing the connections of accounts that
//! are gone. Each version names the one it was made from (header `Wsp-After`). On a
//! clustered nats-server before 2.9.21 that check can let two editors' writes both pass
//! (nats-server issue 4320): an edit is then *settled* ([`settled`]): a barrier record
//! after the write, then the versions after it read back — an edit another version
//! replaced without containing it is made again. The list holds what the file holds: names, groups, rights, public keys and the
//! SHA-256 of bearer tokens, never a token or a secret key.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures_util::StreamExt;

use crate::config::ClusterConfig;
use crate::store::StoreError;

/// Versions of the list kept in the stream.
const KEPT: i64 = 16;

fn subject(prefix: &str) -> String {
    format!("{prefix}_accounts.list")
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("JetStream {what}: {e}"))
}

/// The account list's stream, created if missing.
pub async fn open(
    js: &jetstream::Context,
    cluster: &ClusterConfig,
) -> Result<stream::Stream, StoreError> {
    js.get_or_create_stream(stream::Config {
        name: format!("{}_ACCOUNTS", cluster.stream),
        subjects: vec![format!("{}_accounts.>", cluster.subject_prefix)],
        max_messages_per_subject: KEPT,
        storage: stream::StorageType::File,
        num_replicas: cluster.replicas,
        ..Default::default()
    })
    .await
    .map_err(|e| unavailable("account stream", e))
}

/// The latest version of the list: (its stream sequence, the TOML text); `None` when no
/// list was written yet.
pub async fn latest(
    stream: &stream::Stream,
    cluster: &ClusterConfig,
) -> Result<Option<(u64, String)>, StoreError> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind as K;
    match stream
        .get_last_raw_message_by_subject(&subject(&cluster.subject_prefix))
        .await
    {
        Ok(m) => Ok(Some((
            m.sequence,
            String::from_utf8_lossy(&m.payload).into_owned(),
        ))),
        Err(e) if e.kind() == K::NoMessageFound => Ok(None),
        Err(e) => Err(unavailable("account list read", e)),
    }
}

/// The header naming the version a version was made from (its stream sequence).
const AFTER_HEADER: &str = "Wsp-After";

/// Writes `text` as the new version if `after` (a stream sequence, 0 for none) is still
/// the latest: `Ok(false)` when another writer came first (read again and redo the change).
/// On a server whose check can let a racing edit pass too, the edit is [`settled`].
pub async fn replace(
    js: &jetstream::Context,
    cluster: &ClusterConfig,
    after: u64,
    text: String,
) -> Result<bool, StoreError> {
    let Some(seq) = write(js, cluster, after, text).await? else {
        return Ok(false);
    };
    let info = js.client().server_info();
    if !super::needs_confirms(&info, cluster.replicas) {
        return Ok(true);
    }
    settled(js, cluster, seq).await
}

/// The conditional write of [`replace`]: the new version's sequence, `None` when `after`
/// was not the latest.
pub async fn write(
    js: &jetstream::Context,
    cluster: &ClusterConfig,
    after: u64,
    text: String,
) -> Result<Option<u64>, StoreError> {
    let mut h = HeaderMap::new();
    h.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        after.to_string().as_str(),
    );
    h.insert(AFTER_HEADER, after.to_string().as_str());
    let r = js
        .publish_with_headers(subject(&cluster.subject_prefix), h, Bytes::from(text))
        .await
        .map_err(|e| unavailable("account list write", e))?
        .await;
    match r {
        Ok(ack) => Ok(Some(ack.sequence)),
        Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => Ok(None),
        Err(e) => Err(unavailable("account list write", e)),
    }
}

/// Whether the version written at `seq` is in the list: a barrier record in the stream
/// (it comes after every write that passed the check with this one), then the versions
/// from the latest back along `Wsp-After` — reaching `seq` means every later version was
/// made from it; jumping below it (or a version without the header) means a version made
/// from an older one replaced it: `false`, read again and redo the change.
pub async fn settled(
    js: &jetstream::Context,
    cluster: &ClusterConfig,
    seq: u64,
) -> Result<bool, StoreError> {
    super::barrier(js, format!("{}_accounts.barrier", cluster.subject_prefix))
        .await
        .map_err(|e| unavailable("account list barrier", e))?;
    let stream = open(js, cluster).await?;
    let latest = stream
        .get_last_raw_message_by_subject(&subject(&cluster.subject_prefix))
        .await
        .map_err(|e| unavailable("account list read", e))?;
    let (mut at, mut headers) = (latest.sequence, latest.headers);
    for _ in 0..KEPT {
        if at == seq {
            return Ok(true);
        }
        let from = headers
            .get(AFTER_HEADER)
            .and_then(|v| v.as_str().parse::<u64>().ok());
        match from {
            Some(f) if f >= seq => {
                let m = stream
                    .get_raw_message(f)
                    .await
                    .map_err(|e| unavailable("account list read", e))?;
                (at, headers) = (m.sequence, m.headers);
            }
            _ => return Ok(false),
        }
    }
    Ok(false)
}

/// Calls `each` with every version of the list written after sequence `after`, in order,
/// for as long as the relay runs (the read is re-created after an error).
pub async fn follow(
    stream: stream::Stream,
    cluster: ClusterConfig,
    mut after: u64,
    mut each: impl FnMut(&str),
) {
    loop {
        match super::read_from(&stream, Some(subject(&cluster.subject_prefix)), after + 1).await {
            Ok(mut msgs) => {
                while let Some(Ok(m)) = msgs.next().await {
                    let Ok(info) = m.info() else { continue };
                    if info.stream_sequence <= after {
                        continue;
                    }
                    after = info.stream_sequence;
                    each(&String::from_utf8_lossy(&m.payload));
                }
            }
            Err(e) => tracing::warn!(error = %e, "cluster accounts: cannot follow the list"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
