//! Ids are exact: saga ids that differ only by case are different sagas, with their own
//! fences, states and dead letters, on every database.

use redpacket_common::on_every_backend;
use redpacket_common::testing::{Backend, TestDatabase};
use redpacket_migrations::{Migrator, MigratorTrait};
use redpacket_saga_worker::store::{NewSaga, SagaStore, state};

async fn saga_ids_differing_only_by_case_are_different_sagas_and_dead_letters_on_every_database(
    backend: Backend,
) {
    let database = TestDatabase::create(backend).await;
    let db = redpacket_common::db::connect(&database.url, 4)
        .await
        .unwrap();
    Migrator::up(&db, None).await.unwrap();
    let store = SagaStore::new(db.clone());
    // Claim ids are hex: written in lowercase, but the same digits in uppercase still name a
    // claim of the same campaign, so their grab sagas must never be taken for each other.
    let lower = "grab:00000000000abcde000000000000002a";
    let upper = "grab:00000000000ABCDE000000000000002a";
    let sagas: Vec<NewSaga<'_>> = [lower, upper]
        .into_iter()
        .map(|id| NewSaga {
            id,
            kind: "grab",
            payload: format!(r#"{{"saga":"{id}"}}"#),
            request_id: None,
        })
        .collect();
    let owned = store.claim_many(&sagas, 10).await.unwrap();
    assert_eq!(owned.len(), 2, "{owned:?}");
    for id in [lower, upper] {
        assert_eq!(owned[id].payload, format!(r#"{{"saga":"{id}"}}"#));
    }

    // Each moves alone, under its own fence.
    assert!(
        store
            .advance(lower, 10, "credit", state::RUNNING, None)
            .await
            .unwrap()
    );
    assert_eq!(store.get(lower).await.unwrap().unwrap().step, "credit");
    assert_eq!(store.get(upper).await.unwrap().unwrap().step, "start");
    store
        .claim(upper, "grab", "{}", None, 20)
        .await
        .unwrap()
        .unwrap();
    assert!(
        store
            .advance(lower, 10, "mark", state::RUNNING, None)
            .await
            .unwrap(),
        "a newer fence on the other spelling does not fence this one out"
    );
    assert!(
        !store
            .advance(upper, 10, "mark", state::RUNNING, None)
            .await
            .unwrap()
    );

    // Dead letters name their own saga; replaying one wakes only its saga.
    store
        .bury(1, lower, "message of lower", "out of retries")
        .await
        .unwrap();
    store
        .bury(2, upper, "message of upper", "out of retries")
        .await
        .unwrap();
    let letters = store.dead_letters(10).await.unwrap();
    let named: Vec<(i64, &str, &str)> = letters
        .iter()
        .map(|l| (l.id, l.saga_id.as_str(), l.message.as_str()))
        .collect();
    assert_eq!(
        named,
        [
            (2, upper, "message of upper"),
            (1, lower, "message of lower")
        ]
    );
    store.unbury(&letters[1]).await.unwrap();
    assert_eq!(
        store.get(lower).await.unwrap().unwrap().state,
        state::RUNNING
    );
    assert_eq!(store.get(upper).await.unwrap().unwrap().state, state::STUCK);

    store
        .finish_many(&[lower], 10, state::COMPLETED)
        .await
        .unwrap();
    assert_eq!(
        store.get(lower).await.unwrap().unwrap().state,
        state::COMPLETED
    );
    assert_eq!(store.get(upper).await.unwrap().unwrap().state, state::STUCK);
    assert!(
        store
            .get("GRAB:00000000000abcde000000000000002a")
            .await
            .unwrap()
            .is_none()
    );
    db.close().await.unwrap();
    database.drop_database().await;
}
on_every_backend!(
    saga_ids_differing_only_by_case_are_different_sagas_and_dead_letters_on_every_database
);
