//! The GC lease, taken and renewed with conditional writes.

use std::time::Duration;

use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::ObjError;
use kiln_storage::now_ms;

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct LeaseBody {
    holder: String,
    expires_ms: u64,
}

impl Bucket {
    /// Takes or renews the lease `name` for `holder` until now + `ttl`.
    /// True when `holder` holds it afterwards. Conditional writes make two
    /// replicas that race for an expired lease end with exactly one holder.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, ObjError> {
        let path = self.lease_path(name);
        let now = now_ms();
        let body = serde_json::to_vec(&LeaseBody {
            holder: holder.to_owned(),
            expires_ms: now + ttl.as_millis() as u64,
        })
        .map_err(|e| ObjError::Corrupt {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        let mode = match self.store.get(&path).await {
            Err(e) if is_not_found(&e) => PutMode::Create,
            Err(e) => return Err(ctx(format!("GET lease {name}"))(e)),
            Ok(result) => {
                let version = UpdateVersion {
                    e_tag: result.meta.e_tag.clone(),
                    version: result.meta.version.clone(),
                };
                let bytes = result
                    .bytes()
                    .await
                    .map_err(ctx(format!("GET lease {name}")))?;
                // An unreadable lease is treated as expired: GC must not
                // stop forever because of one bad object.
                let current: Option<LeaseBody> = serde_json::from_slice(&bytes).ok();
                if let Some(current) = &current
                    && current.holder != holder
                    && current.expires_ms > now
                {
                    return Ok(false);
                }
                PutMode::Update(version)
            }
        };
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(body.clone()), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                // No conditional writes: the check above is all we have;
                // docs/object-storage.md says to name one GC replica then.
                self.store
                    .put(&path, PutPayload::from(body))
                    .await
                    .map_err(ctx(format!("PUT lease {name}")))?;
                Ok(true)
            }
            Err(e) => Err(ctx(format!("PUT lease {name}"))(e)),
        }
    }

    /// Gives the lease up if `holder` has it (best effort).
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), ObjError> {
        let path = self.lease_path(name);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(ctx(format!("GET lease {name}")))?,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(ctx(format!("GET lease {name}"))(e)),
        };
        let ours = serde_json::from_slice::<LeaseBody>(&bytes).is_ok_and(|l| l.holder == holder);
        if ours {
            self.delete(&path, &format!("lease {name}")).await?;
        }
        Ok(())
    }
}
