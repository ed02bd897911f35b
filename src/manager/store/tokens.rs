//! API tokens: only a BLAKE3 hash of each secret is stored; the secret is shown once.

use super::entity::api_token;
use super::{finish_page, new_id, now, page_limit, Actor, NewEvent, Store, StoreError};
use crate::model::access::Role;
use crate::model::names::Name;
use crate::model::ValidationError;
use crate::proto::api::{Page, PageQuery, Token, TokenCreate, TokenCreated};
use chrono::Duration;
use rand::RngCore;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, EntityTrait, IntoActiveModel, PaginatorTrait, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait,
};

/// Every secret starts with this, so leaked tokens are easy to scan for.
pub const SECRET_PREFIX: &str = "bwk_";
const SHOWN_PREFIX_LEN: usize = SECRET_PREFIX.len() + 8;
/// `last_used_at` is refreshed at most this often, so reads don't all become writes.
const LAST_USED_GRANULARITY_SECS: i64 = 60;

/// A token that passed authentication.
#[derive(Debug, Clone)]
pub struct AuthenticatedToken {
    pub id: String,
    pub name: String,
    pub role: Role,
}

pub fn hash_secret(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

fn to_token(m: api_token::Model) -> Token {
    Token {
        role: Role::parse(&m.role).unwrap_or(Role::Viewer),
        id: m.id,
        name: m.name,
        prefix: m.prefix,
        created_at: m.created_at,
        last_used_at: m.last_used_at,
        expires_at: m.expires_at,
        revoked_at: m.revoked_at,
    }
}

impl Store {
    pub async fn create_token(
        &self,
        actor: &Actor,
        input: TokenCreate,
    ) -> Result<TokenCreated, StoreError> {
        let name = Name::parse(&input.name)?;
        if input.expires_in_days == Some(0) || input.expires_in_days.is_some_and(|d| d > 3650) {
            return Err(ValidationError::new(
                "token.expiry_out_of_range",
                "expires_in_days",
                "expiry must be 1 to 3650 days",
            )
            .into());
        }
        let secret = generate_secret();
        let t = now();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = api_token::ActiveModel {
            id: Set(new_id()),
            name: Set(name.to_string()),
            role: Set(input.role.as_str().to_string()),
            token_hash: Set(hash_secret(&secret)),
            prefix: Set(secret[..SHOWN_PREFIX_LEN].to_string()),
            created_at: Set(t),
            last_used_at: Set(None),
            expires_at: Set(input
                .expires_in_days
                .map(|d| t + Duration::days(i64::from(d)))),
            revoked_at: Set(None),
        }
        .insert(&txn)
        .await?;
        NewEvent::info(
            "token.created",
            "token",
            &m.id,
            format!("{} token {name} created", input.role),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(TokenCreated {
            token: to_token(m),
            secret,
        })
    }

    pub async fn list_tokens(&self, p: &PageQuery) -> Result<Page<Token>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = api_token::Entity::find().order_by_asc(api_token::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(api_token::Column::Id.gt(c.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        Ok(finish_page(rows, limit, |m| m.id.clone(), to_token))
    }

    /// Revokes a token; revoking twice is harmless.
    pub async fn revoke_token(&self, actor: &Actor, id: &str) -> Result<Token, StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = api_token::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("token", id))?;
        if cur.revoked_at.is_some() {
            return Ok(to_token(cur));
        }
        let name = cur.name.clone();
        let mut am = cur.into_active_model();
        am.revoked_at = Set(Some(now()));
        let m = am.update(&txn).await?;
        NewEvent::info(
            "token.revoked",
            "token",
            id,
            format!("token {name} revoked"),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(to_token(m))
    }

    /// The live token behind `secret`, or None (unknown, revoked or expired).
    pub async fn authenticate(
        &self,
        secret: &str,
    ) -> Result<Option<AuthenticatedToken>, StoreError> {
        if !secret.starts_with(SECRET_PREFIX) || secret.len() > 128 {
            return Ok(None);
        }
        let Some(m) = api_token::Entity::find()
            .filter(api_token::Column::TokenHash.eq(hash_secret(secret)))
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        let t = now();
        if m.revoked_at.is_some() || m.expires_at.is_some_and(|e| e <= t) {
            return Ok(None);
        }
        let Some(role) = Role::parse(&m.role) else {
            return Ok(None);
        };
        if m.last_used_at
            .is_none_or(|u| (t - u).num_seconds() >= LAST_USED_GRANULARITY_SECS)
        {
            api_token::Entity::update_many()
                .col_expr(
                    api_token::Column::LastUsedAt,
                    sea_orm::sea_query::Expr::value(t),
                )
                .filter(api_token::Column::Id.eq(m.id.as_str()))
                .exec(&self.db)
                .await?;
        }
        Ok(Some(AuthenticatedToken {
            id: m.id,
            name: m.name,
            role,
        }))
    }

    /// On a database that has never had a token, creates the first admin token so a
    /// new user can sign in; afterwards it does nothing and returns None.
    pub async fn bootstrap_admin_token(&self) -> Result<Option<TokenCreated>, StoreError> {
        if api_token::Entity::find().count(&self.db).await? > 0 {
            return Ok(None);
        }
        let created = self
            .create_token(
                &Actor::system(),
                TokenCreate {
                    name: "bootstrap-admin".into(),
                    role: Role::Admin,
                    expires_in_days: None,
                },
            )
            .await?;
        Ok(Some(created))
    }
}
