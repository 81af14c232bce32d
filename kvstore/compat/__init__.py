"""Other stores' client APIs on kvstore, so code written for them runs on a kvstore cluster by
changing one import: ``kvstore.compat.mooncake`` (Mooncake Store's ``mooncake.store``)."""
