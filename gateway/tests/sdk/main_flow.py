"""The main flow through the Python SDK generated from the committed openapi.json.

Usage: main_flow.py GATEWAY_URL OPERATOR_TOKEN MERCHANT_TOKEN MERCHANT_ID USER_TOKEN...
Exits non-zero (with the reason) when any step does not behave as the contract says.
"""

import datetime
import sys
import time

from red_packets_client import AuthenticatedClient
from red_packets_client.api.admin import post_v1_admin_topups
from red_packets_client.api.merchant import (
    get_v1_campaigns_id,
    get_v1_campaigns_id_stats,
    get_v1_merchants_me_wallet,
    post_v1_campaigns,
)
from red_packets_client.api.user import get_v1_claims_id, get_v1_me_wallet, post_v1_campaigns_id_grab
from red_packets_client.models import GrabResult, NewCampaign, TopupBody


def expect(condition, message):
    if not condition:
        sys.exit(f"SDK flow failed: {message}")


def wait_for(what, probe, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.1)
    sys.exit(f"SDK flow failed: timed out waiting for {what}")


def main():
    url, operator, merchant, merchant_id, *users = sys.argv[1:]
    client = lambda token: AuthenticatedClient(base_url=url, token=token, raise_on_unexpected_status=True)
    ops, shop = client(operator), client(merchant)

    topped = post_v1_admin_topups.sync(
        client=ops,
        body=TopupBody(merchant_id=merchant_id, amount=50_000, currency="CNY"),
        idempotency_key=f"sdk-{merchant_id}",
    )
    expect(topped.balance == 50_000, f"top-up balance {topped.balance}")

    now = datetime.datetime.now(datetime.timezone.utc)
    campaign = post_v1_campaigns.sync(
        client=shop,
        body=NewCampaign.from_dict(
            {
                "title": "SDK flow",
                "currency": "CNY",
                "total_amount": 10_000,
                "packet_count": 20,
                "split": {"mode": "double_mean"},
                "starts_at": (now + datetime.timedelta(seconds=2)).isoformat(),
                "ends_at": (now + datetime.timedelta(minutes=10)).isoformat(),
            }
        ),
        idempotency_key=f"sdk-campaign-{merchant_id}",
    )
    expect(campaign.status == "funding", f"new campaign status {campaign.status}")
    wait_for(
        "the campaign to be funded and active",
        lambda: get_v1_campaigns_id.sync(campaign.id, client=shop).status == "active",
    )

    grabs = []
    for token in users:
        result = post_v1_campaigns_id_grab.sync(campaign.id, client=client(token))
        expect(isinstance(result, GrabResult), f"grab answered {result}")
        expect(result.status == "pending" and result.amount >= 1, f"grab {result}")
        grabs.append((token, result))

    for token, grabbed in grabs:
        claim = wait_for(
            f"claim {grabbed.claim_id} to be credited",
            lambda: (c := get_v1_claims_id.sync(grabbed.claim_id, client=client(token))).status == "credited" and c,
        )
        wallet = get_v1_me_wallet.sync(client=client(token))
        expect(wallet.balance == grabbed.amount, f"user wallet {wallet.balance} != {grabbed.amount}")
        expect(claim.amount == grabbed.amount, "claim amount")

    total = sum(g.amount for _, g in grabs)
    stats = get_v1_campaigns_id_stats.sync(campaign.id, client=shop)
    expect(stats.amount_credited == total, f"stats credited {stats.amount_credited} != {total}")
    wallet = get_v1_merchants_me_wallet.sync(client=shop)
    expect(wallet.balance == 40_000, f"merchant wallet {wallet.balance}")
    print(f"SDK flow ok: {len(grabs)} grabs, {total} credited")


if __name__ == "__main__":
    main()
