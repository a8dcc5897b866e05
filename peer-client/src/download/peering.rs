//! Peering: the piece manifest from the cache node gives the file's layout, and peers from
//! the node's peering API become sources offered only the pieces they hold.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use crate::content::partial::PartialFile;
use crate::download::progress::Event;
use crate::download::scheduler::Scheduler;
use crate::error::DownloadError;
use crate::sources::node_api::{ContentId, ManifestExt, NodeApi, PeerEntry, PeerHoldings};
use crate::sources::source::{Source, SourceSlot};

use super::{random_u64, AbortOnDrop, Engine, Layout, PeeringState};

impl<'a> Engine<'a> {
    /// With a manifest: asks the tracker for peers once (so they are known before the first
    /// piece) and starts the task that refreshes the list. Losing the node later changes nothing:
    /// the peers stay.
    pub(super) async fn start_peering(&mut self) {
        let Some(manifest) = self.request.manifest.clone() else {
            return;
        };
        let Some(api) = self.downloader.node_api(&self.request.url) else {
            return;
        };
        let config = Arc::clone(&self.downloader.config);
        let ask = move |api: NodeApi, content_id: ContentId| {
            let config = Arc::clone(&config);
            async move {
                api.peers(
                    content_id,
                    config.download_mode,
                    &config.raw.group_id,
                    config.raw.peering.max_peers,
                )
                .await
            }
        };
        let first = ask(api.clone(), manifest.content_id).await;
        let (sender, updates) = tokio::sync::mpsc::channel(4);
        let interval = self.downloader.config.raw.peering.peer_refresh_interval;
        let content_id = manifest.content_id;
        let refresher = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                match ask(api.clone(), content_id).await {
                    Ok(peers) => {
                        if sender.send(peers).await.is_err() {
                            return;
                        }
                    }
                    Err(error) => tracing::debug!(%error, "peer list refresh failed"),
                }
            }
        });
        let delay = Duration::from_secs(self.downloader.config.raw.delay_http_fallback_secs);
        self.peering = Some(PeeringState {
            manifest,
            updates,
            _refresher: AbortOnDrop(refresher.abort_handle()),
            origin_opens_at: self.started + delay,
            peers_known: 0,
        });
        match first {
            Ok(peers) => self.add_peers(peers),
            Err(error) => tracing::info!(%error, "no peer list yet"),
        }
        let peers = self.sources.peers().len();
        self.emit(Event::PeersFound { peers });
    }

    /// Adds the peers the tracker offered (up to `peering.max_peers`) and updates what the
    /// known ones hold.
    pub(super) fn add_peers(&mut self, entries: Vec<PeerEntry>) {
        let Some(peering) = &mut self.peering else {
            return;
        };
        let piece_count = peering.manifest.piece_count();
        let max_peers = self.downloader.config.raw.peering.max_peers;
        for entry in entries {
            let holdings = entry.holdings(piece_count);
            let known = self.sources.slots.iter_mut().find(|slot| {
                matches!(&slot.source, Source::Peer { address, .. } if *address == entry.address)
            });
            if let Some(slot) = known {
                slot.holdings = Some(holdings);
                continue;
            }
            if self.sources.peers().len() >= max_peers {
                continue;
            }
            let Ok(url) = format!(
                "http://{}/content/{}",
                entry.address, peering.manifest.content_id
            )
            .parse::<Uri>() else {
                continue;
            };
            let mut slot = SourceSlot::new(
                Source::Peer {
                    address: entry.address,
                    url,
                },
                self.downloader.config.raw.peering.connections_per_peer,
            );
            slot.holdings = Some(holdings);
            peering.peers_known += 1;
            tracing::debug!(peer = %entry.address, complete = entry.complete, "peer added");
            self.sources.slots.push(slot);
        }
    }

    /// A download with a manifest knows its length and version before any request.
    pub(super) fn layout_from_manifest(&mut self) -> Result<(), DownloadError> {
        let Some(manifest) = self.request.manifest.clone() else {
            return Ok(());
        };
        if self.layout.is_some() {
            return Ok(());
        }
        let file = PartialFile::create(&self.paths.partial, manifest.size).map_err(|error| {
            DownloadError::disk(format!("creating {}", self.paths.partial.display()), error)
        })?;
        self.piece_len = manifest.piece_size;
        self.emit(Event::Started {
            file_len: manifest.size,
            resumed_bytes: 0,
        });
        let mut scheduler = Scheduler::new(manifest.size, manifest.piece_size, &[]);
        scheduler.start_at(random_u64());
        self.layout = Some(Layout {
            scheduler,
            file,
            validator: manifest.validator(),
        });
        self.start_rate_probe();
        Ok(())
    }
}
