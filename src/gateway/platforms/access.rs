//! Who may talk to the agent: the configuration's lists, and users the operator approved
//! after they were given a pairing code. Users who may not are told so at most hourly.

use std::sync::PoisonError;
use std::time::{Duration, Instant};

use serde_json::json;

use super::commands;
use super::{Instance, Platforms};
use crate::config::AccessConfig;
use crate::gateway::ids::new_id;
use crate::store::deliveries::{self as rows, DeliveryRow};
use crate::store::platforms::{self as stored, PlatformUser};
use crate::store::{self, StoreError};

/// A refused user is told again at most this often.
const TELL_AGAIN: Duration = Duration::from_secs(3600);

impl Platforms {
    pub(super) fn allowed(&self, inst: &Instance, access: &AccessConfig, user: &str) -> bool {
        access.allow_all
            || access.allowed_users.iter().any(|u| u == user)
            || access.admins.iter().any(|u| u == user)
            || self
                .inner
                .approved
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&(inst.key.clone(), user.to_owned()))
    }

    /// Whether a user who may not talk to the agent is to be told so now (at most hourly).
    pub(super) fn tell(&self, inst: &Instance, user: &str) -> bool {
        let mut told = self
            .inner
            .told
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if told.len() > 10_000 {
            told.retain(|_, t| now.duration_since(*t) < TELL_AGAIN);
        }
        let k = (inst.key.clone(), user.to_owned());
        match told.get(&k) {
            Some(t) if now.duration_since(*t) < TELL_AGAIN => false,
            _ => {
                told.insert(k, now);
                true
            }
        }
    }

    /// Pairing requests and approved users.
    pub async fn pairing_list(&self) -> Result<Vec<PlatformUser>, StoreError> {
        self.inner.store.read(stored::users).await
    }

    /// Approves the user holding `code`; they are told in their chat.
    pub async fn approve(&self, code: &str) -> Result<Option<PlatformUser>, StoreError> {
        let code = code.trim().to_ascii_uppercase();
        let now = store::now_ms();
        let approved = self
            .inner
            .store
            .write(move |c| {
                let Some(u) = stored::approve(c, &code, now)? else {
                    return Ok(None);
                };
                let route = format!("{}:{}", u.platform, u.name);
                let row = DeliveryRow {
                    id: new_id("dlv_"),
                    route,
                    source_id: format!("approved:{}", u.user_id),
                    event: "notice".into(),
                    state: "pending".into(),
                    prompt: String::new(),
                    session_id: None,
                    run_id: String::new(),
                    target: u.chat.clone(),
                    result: Some(
                        json!({"status": "completed", "output": commands::APPROVED}).to_string(),
                    ),
                    attempts: 0,
                    last_error: None,
                    next_attempt_at: Some(now),
                    received_at: now,
                    updated_at: now,
                    progress: 0,
                };
                rows::insert(c, &row)?;
                Ok(Some((u, row)))
            })
            .await?;
        let Some((u, row)) = approved else {
            return Ok(None);
        };
        let k = (format!("{}:{}", u.platform, u.name), u.user_id.clone());
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&k);
        self.inner
            .told
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&k);
        self.inner
            .approved
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(k);
        tracing::info!(platform = %u.platform, user_id = %u.user_id,
            "pairing approved: {} ({}) on {} `{}`", u.display, u.user_id, u.platform, u.name);
        self.inner.ledger.spawn(row);
        Ok(Some(u))
    }

    /// Forgets a user's approval or pairing request (on every instance, or those named).
    pub async fn revoke(
        &self,
        user: &str,
        platform: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<PlatformUser>, StoreError> {
        let u = user.to_owned();
        let removed = self
            .inner
            .store
            .write(move |c| stored::revoke(c, &u, platform.as_deref(), name.as_deref()))
            .await?;
        for r in &removed {
            let k = (format!("{}:{}", r.platform, r.name), r.user_id.clone());
            self.inner
                .approved
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&k);
            self.inner
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&k);
            tracing::info!(platform = %r.platform, user_id = %r.user_id,
                "access revoked: {} on {} `{}`", r.user_id, r.platform, r.name);
        }
        Ok(removed)
    }
}
